"""Runs that survive the coordinator: its ServerApp killed, then the whole coordinator killed and started again.

`flowerbed superlink start` runs as a real subprocess (as systemd would start it), two SuperNodes
under their supervisors; every kill is SIGKILL. The run resumes from its last checkpoint by itself
each time, and its history keeps every trained round exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from flowerbed.config import RunSettings, load_federation
from flowerbed.demodata import make_demo_data
from flowerbed.layout import FederationLayout
from flowerbed.probes import tcp_open
from flowerbed.runfolder import SERVERAPP_FILE, read_rows, run_id_of
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, make_config, make_federation, run_cli, supervised_sites, wait_for
from tests.faults import record


class Coordinator:
    """`flowerbed superlink start` in a subprocess, its output in a file."""

    def __init__(self, layout: FederationLayout, out: Path) -> None:
        self.layout, self.out_path = layout, out
        self.proc: subprocess.Popen[str] | None = None
        self.handle: IO[str] | None = None

    def start(self) -> Coordinator:
        """Started by the ExecStart line of the kit's own systemd unit, as systemd would run it."""
        unit = run_cli("kit", "coordinator-unit", "-d", str(self.layout.root))
        assert unit.returncode == 0, unit.stderr
        exec_start = next(line for line in unit.stdout.splitlines() if line.startswith("ExecStart="))
        assert "resumes" in unit.stdout  # its comment says runs resume: this test is what makes it true
        self.handle = self.out_path.open("a")
        self.proc = subprocess.Popen(shlex.split(exec_start.removeprefix("ExecStart=")), cwd=self.layout.root,
                                     stdout=self.handle, stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "200"}, start_new_session=True, text=True)  # fmt: skip
        return self

    def text(self) -> str:
        return " ".join(self.out_path.read_text().split())

    def pids(self) -> dict[str, int]:
        path = self.layout.pidfile
        return json.loads(path.read_text())["processes"] if path.exists() else {}

    def kill_all(self) -> None:
        """Power loss: the supervisor and every process group it started, SIGKILL, nothing cleaned up."""
        assert self.proc is not None
        groups = set(self.pids().values())
        os.kill(self.proc.pid, signal.SIGKILL)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.handle is not None:
            self.handle.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)
        if self.handle is not None:
            self.handle.close()


def serverapp_pid(out_dir: Path) -> int:
    return int(json.loads((out_dir / SERVERAPP_FILE).read_text())["pid"])


def trained(out_dir: Path) -> list[int]:
    return [r["round"] for r in read_rows(out_dir) if r["kind"] == "train"]


@pytest.mark.federation
def test_a_run_resumes_after_its_serverapp_and_then_the_whole_coordinator_are_killed(tmp_path: Path) -> None:
    config = make_config("resume", SITES[:2], min_nodes=2)
    layout = make_federation(tmp_path / "fed", config)
    coordinator = Coordinator(layout, tmp_path / "coordinator.out").start()
    sites = contextlib.ExitStack()
    try:
        assert wait_for(lambda: "is up" in coordinator.text(), 120), coordinator.text()
        data = make_demo_data(tmp_path / "data", SITES)
        sites.enter_context(
            supervised_sites(
                layout,
                f"localhost:{config.superlink.port}",
                {s: data.site_files[s] for s in SITES[:2]},
                tmp_path,
                max_backoff_s=5,
            )
        )
        settings = RunSettings.model_validate(
            load_federation(layout.root).run.model_dump()
            | {"max_rounds": 5, "patience": 10, "round_timeout_s": 60, "node_wait_s": 180, "local_epochs": 150}
        )
        handle = submit(layout, settings, name="survivor")
        assert wait_for(lambda: len(trained(handle.out_dir)) >= 1, 180), coordinator.text()

        # 1. The ServerApp dies mid-run: the coordinator resumes the run by itself.
        first_id = handle.run_id
        killed = time.monotonic()
        os.kill(serverapp_pid(handle.out_dir), signal.SIGKILL)
        assert wait_for(lambda: run_id_of(handle.out_dir) != first_id, 60), coordinator.text()
        noticed = time.monotonic() - killed
        assert wait_for(lambda: "was interrupted after round 1; resumed as Flower run" in coordinator.text(), 30)
        before = len(trained(handle.out_dir))
        assert wait_for(lambda: len(trained(handle.out_dir)) > before, 180), coordinator.text()
        record("kill -9 the ServerApp", "resumed by the coordinator from the last checkpoint",
               noticed_s=noticed, recovered_s=time.monotonic() - killed, rounds_lost=0, replies_lost=0)  # fmt: skip

        # 2. The whole coordinator dies (power loss) and is started again, as systemd would.
        second_id = run_id_of(handle.out_dir)
        done = len(trained(handle.out_dir))
        killed = time.monotonic()
        coordinator.kill_all()
        assert not tcp_open("127.0.0.1", config.superlink.port)
        coordinator.start()
        assert wait_for(lambda: run_id_of(handle.out_dir) != second_id, 150), coordinator.text()
        noticed = time.monotonic() - killed
        assert wait_for(lambda: len(trained(handle.out_dir)) > done, 240), coordinator.text()
        record("kill -9 the whole coordinator, start it again", "resumed at start-up from the last checkpoint",
               noticed_s=noticed, recovered_s=time.monotonic() - killed, rounds_lost=0, replies_lost=0)  # fmt: skip

        result = follow(layout, handle, timeout_s=400)
        check_result(result, handle)
        rows = result.rows
        assert trained(handle.out_dir) == [1, 2, 3, 4, 5]  # every round once: none lost, none twice
        resumed = [r for r in rows if r["kind"] == "resumed"]
        assert len(resumed) == 2 and "ServerApp had died" in resumed[0]["stop_reason"]
        assert "coordinator had stopped" in resumed[1]["stop_reason"]
        assert result.summary["status"] == "completed" and result.summary["rounds"] == 5
        assert (handle.out_dir / "final_model.pt").exists()
        assert len(list((handle.out_dir / "checkpoints").glob("round-*.pt"))) == 3

        listing = run_cli("runs", "-d", str(layout.root))
        assert listing.returncode == 0 and "survivor" in listing.stdout and "completed" in listing.stdout
        followed = run_cli("runs", "follow", "survivor", "-d", str(layout.root))  # from another terminal
        assert followed.returncode == 0, followed.stderr
        assert "stopped: max-rounds after 5 rounds" in " ".join(followed.stdout.split())
    finally:
        sites.close()
        coordinator.stop()
    assert not tcp_open("127.0.0.1", config.superlink.port) and not tcp_open(
        "127.0.0.1", config.superlink.internal_port
    )
