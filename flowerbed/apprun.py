"""``flowerbed run --app FOLDER``: a Flower App of one's own, through the kit's SuperLink, gateway and approvals.

The app (as ``flwr new`` makes it, with its own ServerApp and ClientApp) is submitted to the local
SuperLink; Flower sends its FAB to the sites, where the approval gate runs it only if the site
approved that FAB's sha256. flowerbed's own loop (convergence criteria, history, checkpoints,
resume) is not involved: the app's ServerApp decides everything.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerbed.artifacts import FabInfo, read_app
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import RUN_ID_FILE
from flowerbed.runner import FINISHED, check_superlink
from flowerbed.superlink import control, flwrcli

APP_RUN_FILE = "app-run.json"
APP_LOG = "serverapp.log"


@dataclass(frozen=True)
class AppRun:
    """A submitted Flower App run: its Flower run id, folder and app."""

    run_id: int
    out_dir: Path
    app: FabInfo


def submit_app(
    layout: FederationLayout,
    app_dir: Path,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    control_port: int | None = None,
) -> AppRun:
    """Submit the Flower App in ``app_dir`` (``config`` overrides its run config); ``runs/NAME`` records it."""
    if not app_dir.is_dir():
        raise FlowerbedError(f"--app {app_dir}: pass the Flower App's folder (as `flwr new` makes it)")
    app = read_app(app_dir)
    if app.is_kit_app:
        raise FlowerbedError(f"{app_dir} is flowerbed's own app: run it with `flowerbed run`, without --app")
    check_superlink(layout, control_port)
    out_dir = layout.run_dir(name or dt.datetime.now().strftime("app-%Y%m%d-%H%M%S"))
    if out_dir.exists():
        raise FlowerbedError(f"{out_dir} already exists: choose another --name")
    out_dir.mkdir(parents=True)
    try:
        run_id = flwrcli.submit_run(layout.flwr_home, app_dir, config or None)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    record = {"kind": "app", "name": app.name, "version": app.version, "publisher": app.publisher,
              "sha256": app.sha256, "run_id": run_id, "folder": str(app_dir.resolve()), "config": config or {},
              "submitted": time.time()}  # fmt: skip
    (out_dir / APP_RUN_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    (out_dir / RUN_ID_FILE).write_text(str(run_id), encoding="utf-8")
    return AppRun(run_id, out_dir, app)


@dataclass(frozen=True)
class ReplyTally:
    """What the sites answered in a run, as the SuperLink stored it."""

    trained: int = 0
    refused: int = 0
    failed: int = 0
    reasons: tuple[str, ...] = ()


def reply_tally(layout: FederationLayout, run_id: int) -> ReplyTally:
    """The SuperLink's count of run ``run_id``'s replies (none yet: all zero)."""
    try:
        data = json.loads((layout.replies / f"{run_id}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return ReplyTally()
    return ReplyTally(int(data.get("trained", 0)), int(data.get("refused", 0)), int(data.get("failed", 0)),
                      tuple(str(r) for r in data.get("reasons", [])))  # fmt: skip


ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
METRICS_LINE = re.compile(r"Aggregated MetricRecord: (\{.*\})")


@dataclass
class AppRound:
    """One round of an app run that uses Flower's strategies, as its ServerApp's log says it."""

    round: int
    of: int
    train: dict[str, float]
    evaluate: dict[str, float]


def app_rounds(log_text: str) -> list[AppRound]:
    """The rounds a ServerApp's log reports (Flower's ``Strategy.start`` lines: ``[ROUND r/N]``, then the
    aggregated train and evaluate MetricRecords); empty for an app that logs none."""
    rounds: list[AppRound] = []
    for line in log_text.splitlines():
        heading = ROUND_LINE.search(line)
        if heading:
            rounds.append(AppRound(int(heading[1]), int(heading[2]), {}, {}))
            continue
        found = METRICS_LINE.search(line)
        if found and rounds:
            try:
                values = ast.literal_eval(found[1])
            except (ValueError, SyntaxError):
                continue
            metrics = {str(k): float(v) for k, v in values.items() if isinstance(v, int | float)}
            target = rounds[-1].train if not rounds[-1].train else rounds[-1].evaluate
            target.update(metrics)
    return rounds


def follow_app(
    layout: FederationLayout,
    run: AppRun,
    *,
    timeout_s: float,
    poll_s: float = 2.0,
    on_status: Callable[[str, float], None] = lambda _s, _t: None,
    on_rounds: Callable[[list[AppRound]], None] | None = None,
    log_every_s: float = 10.0,
) -> str:
    """Wait until Flower reports the run finished; keep the ServerApp's log in the run folder.

    ``on_rounds``: called with the rounds the ServerApp's log reports so far, every ``log_every_s``.
    """
    started = time.monotonic()
    status = "unknown"
    read_log = started
    while time.monotonic() - started < timeout_s:
        status = control.run_status(layout.flwr_home, run.run_id)
        on_status(status, time.monotonic() - started)
        if status.startswith(FINISHED):
            break
        if on_rounds is not None and time.monotonic() - read_log >= log_every_s:
            read_log = time.monotonic()
            with contextlib.suppress(FlowerbedError):
                on_rounds(app_rounds(flwrcli.run_log(layout.flwr_home, run.run_id)))
        time.sleep(poll_s)
    else:
        raise FlowerbedError(f"run {run.run_id} still {status} after {timeout_s:.0f} s; it goes on (`flwr ls`)")
    try:
        (run.out_dir / APP_LOG).write_text(flwrcli.run_log(layout.flwr_home, run.run_id), encoding="utf-8")
    except FlowerbedError as exc:
        (run.out_dir / APP_LOG).write_text(f"(no log: {exc.message})\n", encoding="utf-8")
    return status
