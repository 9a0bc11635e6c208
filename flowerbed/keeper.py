"""Interrupted runs: found in the run folders, resumed from their last checkpoint by the coordinator.

A run is interrupted when its folder has no ``summary.json`` and the ServerApp process that worked
on it is gone (killed, or the whole coordinator stopped). The coordinator's supervisor resumes such
runs by itself (`flowerbed superlink start`, hence also under systemd); a run that a user stopped
with ``flwr stop`` is recorded as stopped instead, and a run that was resumed twice without
finishing a round is given up, so that a crash loop ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowerbed.apprun import APP_RUN_FILE
from flowerbed.diskspace import free_bytes, is_disk_full, no_space, write_atomic
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import (
    HISTORY_JSONL,
    RESUMED,
    RESUMING_FILE,
    RUN_ID_FILE,
    SUMMARY,
    TRAIN,
    ended,
    read_rows,
    run_folders,
    run_id_of,
    serverapp_alive,
)
from flowerbed.runner import resume
from flowerbed.serverapp.resume import plan_resume
from flowerbed.superlink import control

Report = Callable[[str], None]
MAX_RESUMES_WITHOUT_PROGRESS = 2
UNKNOWN_CHECK_S = 60.0  # runs whose ServerApp never recorded itself cost a `flwr ls` each: checked seldom


def last_activity(out_dir: Path) -> float:
    """When the run last wrote something (epoch seconds)."""
    return max(p.stat().st_mtime for p in (out_dir / "run-id", out_dir / HISTORY_JSONL) if p.exists())


def resumes_without_progress(out_dir: Path) -> int:
    """Resumes at the end of the history with no trained round after them."""
    count = 0
    for row in reversed(read_rows(out_dir)):
        if row.get("kind") == TRAIN:
            break
        count += row.get("kind") == RESUMED
    return count


def interrupted_runs(layout: FederationLayout, *, unknown_too: bool = False) -> list[Path]:
    """Run folders without a result whose ServerApp is gone, oldest first.

    ``unknown_too``: also those whose ServerApp never recorded itself (it died while starting, or
    the run never started); the caller asks Flower about those.
    """
    found = []
    started = [f for f in run_folders(layout.runs) if (f / RUN_ID_FILE).exists()]
    for folder in sorted(started, key=lambda f: (f / RUN_ID_FILE).stat().st_mtime):
        if ended(folder) is not None or (folder / RESUMING_FILE).exists() or (folder / APP_RUN_FILE).exists():
            continue  # ended, being resumed, or a Flower App's run (its own ServerApp: nothing to resume from)
        alive = serverapp_alive(folder)
        if alive is False or (alive is None and unknown_too):
            found.append(folder)
    return found


MIN_FREE = 16 * 1024 * 1024  # below this, an interrupted run is not resumed (its next checkpoint would not fit)


def _disk_line(out_dir: Path, exc: OSError) -> str:
    return no_space(out_dir, MIN_FREE).message if is_disk_full(exc) else f"{out_dir}: {exc.strerror or exc}"


def _end(out_dir: Path, status: str, reason: str) -> None:
    data = {"status": status, "stop_reason": reason, "ended": time.time()}
    write_atomic(out_dir / SUMMARY, json.dumps(data, indent=2).encode("utf-8"))


@dataclass
class RunKeeper:
    """Resumes the coordinator's interrupted runs (``enabled``), or names them (not enabled)."""

    layout: FederationLayout
    report: Report
    enabled: bool = True
    check_s: float = 5.0
    control_port: int | None = None
    max_age_s: float = 24 * 3600.0  # a run idle for longer is named, never resumed by itself
    _next: float = 0.0
    _next_unknown: float = 0.0
    _named: set[str] = field(default_factory=set)
    _attempts: dict[str, tuple[int, int]] = field(default_factory=dict)  # per run: (from round, resumes)
    _said: set[tuple[str, str]] = field(default_factory=set)

    def tick(self, *, why: str = "; its ServerApp had died", startup: bool = False) -> list[str]:
        """Check now if ``check_s`` has passed; the names of the runs resumed."""
        if not startup and time.monotonic() < self._next:
            return []
        self._next = time.monotonic() + self.check_s
        unknown_too = startup or time.monotonic() >= self._next_unknown
        if unknown_too:
            self._next_unknown = time.monotonic() + UNKNOWN_CHECK_S
        resumed = []
        for out_dir in interrupted_runs(self.layout, unknown_too=unknown_too):
            try:
                if self._handle(out_dir, why):
                    resumed.append(out_dir.name)
            except OSError as exc:  # a full disk pauses that run; the coordinator and the other runs go on
                self._say_once(out_dir.name, f"run {out_dir.name} waits to be resumed: {_disk_line(out_dir, exc)}")
        return resumed

    def _say_once(self, name: str, line: str) -> None:
        if (name, line) not in self._said:
            self._said.add((name, line))
            self.report(line)

    def _handle(self, out_dir: Path, why: str) -> bool:
        name = out_dir.name
        run_id = run_id_of(out_dir)
        try:
            status = control.run_status(self.layout.flwr_home, run_id) if run_id is not None else "unknown"
        except FlowerbedError:
            return False  # the SuperLink is restarting: the next check asks again
        if serverapp_alive(out_dir) is None and not status.startswith("finished"):
            return False  # still starting, or queued behind another run: Flower's to run
        if status.endswith("stopped"):
            self.report(f"run {name} (Flower run {run_id}) was stopped with `flwr stop`; it is not resumed")
            _end(out_dir, "stopped", "stopped with `flwr stop`")
            return False
        hint = f"`flowerbed run --resume {name} -d {self.layout.root}`"
        try:
            rounds = plan_resume(out_dir)
        except FlowerbedError as exc:
            self.report(f"run {name} was interrupted and cannot be resumed: {exc.message}")
            _end(out_dir, "failed", f"interrupted; {exc.message}")
            return False
        stale = time.time() - last_activity(out_dir) > self.max_age_s
        if not self.enabled or stale:
            if name not in self._named:
                self._named.add(name)
                self.report(f"run {name} was interrupted after round {rounds}: go on with {hint}")
            return False
        since, count = self._attempts.get(name, (rounds, 0))
        attempts = count if since == rounds else 0  # a round ended since the last resume: progress
        if max(resumes_without_progress(out_dir), attempts) >= MAX_RESUMES_WITHOUT_PROGRESS:
            reason = (
                f"interrupted {MAX_RESUMES_WITHOUT_PROGRESS + 1} times without finishing a round; "
                f"see {self.layout.logs}; go on with {hint} once mended"
            )
            self.report(f"run {name}: {reason}")
            _end(out_dir, "failed", reason)
            return False
        if free_bytes(out_dir) < MIN_FREE:  # it would only die again: paused until there is space
            self._say_once(name, f"run {name} waits to be resumed: {no_space(out_dir, MIN_FREE).message}")
            return False
        try:
            handle = resume(self.layout, name, control_port=self.control_port, why=why)
        except FlowerbedError as exc:
            self.report(f"run {name} was interrupted after round {rounds}; resuming it failed, retrying: {exc.message}")
            return False
        self._attempts[name] = (rounds, attempts + 1)  # counts a ServerApp that dies before writing anything too
        self.report(f"run {name} was interrupted after round {rounds}; resumed as Flower run {handle.run_id}")
        return True
