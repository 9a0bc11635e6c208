"""``flowerbed run``: build the Flower App manifest, submit it, follow its progress."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from flowerbed.config import RunSettings
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import tcp_open
from flowerbed.serverapp.history import SUMMARY, read_rows
from flowerbed.superlink import flwrcli

APP_NAME = "flowerbed-app"
FINISHED = "finished"


def write_app_manifest(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """A Flower App that is a manifest only: the code ships inside the installed kit.

    Every site runs the same pinned flowerbed, so no code is pushed to the sites.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "flowerbed's ServerApp and ClientApp, installed at every site",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "flowerbed",
                    "components": {
                        "serverapp": "flowerbed.serverapp.app:app",
                        "clientapp": "flowerbed.clientapp.app:app",
                    },
                    "config": run_config,
                }
            }
        },
    }
    path = app_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@dataclass(frozen=True)
class RunHandle:
    run_id: int
    out_dir: Path


def submit(
    layout: FederationLayout, settings: RunSettings, name: str | None = None, *, control_port: int | None = None
) -> RunHandle:
    """Write the manifest with the validated settings and submit it to the local SuperLink.

    ``control_port``: the SuperLink's loopback port, checked first so that a stopped coordinator is
    named as such. A run that could not be submitted leaves no run folder behind.
    """
    start_hint = f"`flowerbed superlink start -d {layout.root}` (another terminal, or the service)"
    if not (layout.flwr_home / "config.toml").is_file():
        raise FlowerbedError(f"the SuperLink of {layout.root} was never started: start it with {start_hint}")
    if control_port is not None and not tcp_open("127.0.0.1", control_port):
        raise FlowerbedError(
            f"the SuperLink is not running (nothing answers on 127.0.0.1:{control_port}): start it with {start_hint}"
        )
    stamp = name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    out_dir = layout.runs / stamp
    if out_dir.exists():
        raise FlowerbedError(f"{out_dir} already exists: choose another --name")
    run_config = settings.to_run_config() | {"output-dir": str(out_dir)}
    app_dir = out_dir / "app"
    write_app_manifest(app_dir, run_config)
    try:
        run_id = flwrcli.submit_run(layout.flwr_home, app_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    (out_dir / "run-id").write_text(str(run_id), encoding="utf-8")
    return RunHandle(run_id=run_id, out_dir=out_dir)


@dataclass(frozen=True)
class RunResult:
    status: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def follow(
    layout: FederationLayout,
    handle: RunHandle,
    *,
    on_rows: Callable[[list[dict[str, Any]]], None] = lambda _rows: None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 2.0,
) -> RunResult:
    """Poll history and run status until the run finishes (or ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    status = "unknown"
    while time.monotonic() < end:
        on_rows(read_rows(handle.out_dir))
        try:
            status = flwrcli.run_status(layout.flwr_home, handle.run_id)
        except FlowerbedError as exc:
            raise FlowerbedError(
                f"run {handle.run_id} was submitted and goes on, but following it failed ({exc.message}); "
                f"its results will be in {handle.out_dir}"
            ) from None
        if status.startswith(FINISHED):
            break
        time.sleep(poll_s)
    else:
        raise FlowerbedError(
            f"run {handle.run_id} still {status} after {timeout_s:.0f} s; "
            f"it goes on: follow it with `flwr log {handle.run_id}`"
        )
    rows = read_rows(handle.out_dir)
    on_rows(rows)
    summary_path = handle.out_dir / SUMMARY

    summary = json.loads(summary_path.read_text("utf-8")) if summary_path.exists() else {}
    return RunResult(status=status, rows=rows, summary=summary)


def check_result(result: RunResult, handle: RunHandle) -> None:
    """Raise a run-failed error when the run did not complete as flowerbed defines it."""
    if result.summary.get("status") == "completed" and result.status.endswith("completed"):
        return
    reason = result.summary.get("stop_reason") or f"Flower reports {result.status}"
    raise FlowerbedError(
        f"run {handle.run_id} failed: {reason} (history: {handle.out_dir})",
        exit_code=ExitCode.RUN_FAILED,
    )
