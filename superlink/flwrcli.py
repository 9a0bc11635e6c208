"""Talk to the local SuperLink's Control API through Flower's own ``flwr`` CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from flowerbed.errors import FlowerbedError
from flowerbed.proc import child_env, executable

CONNECTION = "flowerbed"


def write_connection(flwr_home: Path, control_address: str, ca_cert: Path) -> Path:
    """FLWR_HOME/config.toml naming one connection; Flower's default ``local`` would start a simulation."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": control_address, "root-certificates": str(ca_cert.resolve())},
        }
    }
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _invoke(flwr_home: Path, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` in a folder of its own (see :func:`flwr`)."""
    cwd = flwr_home / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    exe = executable("flwr", "reinstall flowerbed in this environment (it brings Flower)")
    try:
        return subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            env=child_env(flwr_home),
            check=False,
            timeout=timeout_s,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        raise FlowerbedError(f"`flwr {args[0]}` did not answer within {timeout_s:.0f} s") from None


def flwr(flwr_home: Path, *args: str, timeout_s: float = 120) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against the local connection and return its JSON.

    ``flwr`` reads a connection name that is also a folder in its working folder as an app path
    (``flwr ls flowerbed`` inside a home holding a ``flowerbed/`` clone fails), so it always runs
    in a folder of its own that holds nothing else.
    """
    result = _invoke(flwr_home, [*args, "--format", "json"], timeout_s)
    out = result.stdout.strip()
    try:
        data: dict[str, Any] = json.loads(out[out.index("{") :]) if "{" in out else {}
    except ValueError:
        data = {}
    if result.returncode != 0 or data.get("success") is False:
        reason = data.get("error-message") or " ".join((result.stderr or out).split())[-300:]
        raise FlowerbedError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
    return data


def list_nodes(flwr_home: Path) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows."""
    data = flwr(flwr_home, "supernode", "ls", CONNECTION)
    nodes: list[dict[str, Any]] = data.get("nodes", [])
    return nodes


def submit_run(flwr_home: Path, app_dir: Path, run_config: dict[str, Any] | None = None) -> int:
    """Submit the Flower App in ``app_dir`` (``run_config`` overrides its config); returns the run id."""
    args = ["run", str(app_dir.resolve()), CONNECTION]
    if run_config:
        args += ["--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())]
    data = flwr(flwr_home, *args, timeout_s=300)
    try:
        return int(data["run-id"])
    except (KeyError, ValueError, TypeError):
        raise FlowerbedError(f"`flwr run` did not return a run id: {data}") from None


def stop_run(flwr_home: Path, run_id: int) -> bool:
    """Ask the SuperLink to stop a run; False when it had already finished."""
    try:
        flwr(flwr_home, "stop", str(run_id), CONNECTION)
    except FlowerbedError as exc:
        if "finished" in exc.message.lower() or "not found" in exc.message.lower():
            return False
        raise
    return True


def run_log(flwr_home: Path, run_id: int) -> str:
    """The ServerApp's log of a run, as Flower keeps it (``flwr log RUN_ID --show``)."""
    result = _invoke(flwr_home, ["log", str(run_id), CONNECTION, "--show"], 120)
    if result.returncode != 0:
        raise FlowerbedError(f"`flwr log {run_id}` failed: {' '.join((result.stderr or result.stdout).split())[-300:]}")
    return result.stdout
