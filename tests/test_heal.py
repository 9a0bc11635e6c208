"""A coordinator that heals: kill -9 any of its processes and the supervisor restarts it, the rest runs on.

`flowerbed superlink start` as a coordinator runs it (a real subprocess); a run with real SuperNodes
goes on across a gateway kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from flowerbed.certs.service import read_cert
from flowerbed.config import RunSettings, load_federation
from flowerbed.demodata import make_demo_data
from flowerbed.probes import grpc_health, presents_certificate, tcp_open
from flowerbed.runfolder import read_rows
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, make_config, make_federation, supervised_sites, wait_for
from tests.faults import record

GATEWAY, SUPERLINK, EXECUTOR = "gateway (nginx)", "flower-superlink", "ServerApp executor"


@pytest.mark.federation
def test_each_coordinator_process_killed_is_restarted_and_a_run_goes_on(tmp_path: Path) -> None:
    config = make_config("heal", SITES[:2], min_nodes=2)
    layout = make_federation(tmp_path / "fed", config)
    sl = config.superlink
    out = (tmp_path / "coordinator.out").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "flowerbed"), "superlink", "start"], cwd=layout.root,
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    text = lambda: " ".join((tmp_path / "coordinator.out").read_text().split())  # noqa: E731
    pids = lambda: json.loads(layout.pidfile.read_text())["processes"] if layout.pidfile.exists() else {}  # noqa: E731
    sites = contextlib.ExitStack()
    try:
        assert wait_for(lambda: "is up" in text(), 120), text()
        data = make_demo_data(tmp_path / "data", SITES)
        sites.enter_context(
            supervised_sites(layout, f"localhost:{sl.port}", {s: data.site_files[s] for s in SITES[:2]}, tmp_path)
        )
        settings = RunSettings.model_validate(
            load_federation(layout.root).run.model_dump() | {"max_rounds": 3, "patience": 10, "round_timeout_s": 45}
        )
        handle = submit(layout, settings, name="across-kills")
        assert wait_for(lambda: len(read_rows(handle.out_dir)) >= 1, 180), text()

        # The gateway dies mid-run: restarted (its worker with it), serving our certificate again.
        killed = time.monotonic()
        os.kill(pids()[GATEWAY], signal.SIGKILL)
        assert wait_for(lambda: f"{GATEWAY} is back" in text(), 60), text()
        ours = read_cert(layout.server_cert).public_bytes(serialization.Encoding.DER)
        assert presents_certificate("127.0.0.1", sl.port, layout.ca_cert, ours)
        back = time.monotonic() - killed
        result = follow(layout, handle, timeout_s=400)
        check_result(result, handle)
        assert [r["round"] for r in result.rows if r["kind"] == "train"] == [1, 2, 3]
        # What the kill cost, as the history says: a round whose uploads the kill cut is retried (a
        # `waiting` row) once its round_timeout_s has passed (the cut reply no longer holds the ServerApp
        # until Flower's object-push session expires, 180 s).
        retried = [r for r in result.rows if r["kind"] == "waiting"]
        record("kill -9 the gateway (nginx) mid-run", '"gateway (nginx) exited with status -9 ...; restarting it", '
               '"... is back"; the run went on', injected="SIGKILL to the nginx master", noticed_s=None,
               recovered_s=back, rounds_lost=0, replies_lost=sum(r["failures"] for r in retried),
               round_retried_after_s=sum(r["seconds"] for r in retried))  # fmt: skip

        # The SuperLink and the executor die in turn: each comes back; the others never stopped.
        for name, probe in ((SUPERLINK, lambda: grpc_health(f"127.0.0.1:{sl.health_port}")),
                            (EXECUTOR, lambda: grpc_health(f"127.0.0.1:{sl.executor_health_port}"))):  # fmt: skip
            before = pids()
            killed = time.monotonic()
            os.kill(before[name], signal.SIGKILL)
            assert wait_for(lambda n=name, b=before: f"{n} is back" in text() and pids().get(n) != b[n], 90), text()
            record(f"kill -9 {name}", f'"{name} exited with status -9 ...; restarting it", "... is back"; the other '
                   "processes ran on", injected=f"SIGKILL to {name}", noticed_s=None,
                   recovered_s=time.monotonic() - killed, rounds_lost=0, replies_lost=0)  # fmt: skip
            assert probe()
            assert all(pids()[other] == before[other] for other in before if other != name)
            assert f"{name} exited with status -9" in text()
        assert proc.poll() is None  # the coordinator itself never stopped
    finally:
        sites.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        out.close()
    assert proc.returncode == 0, text()
    assert not tcp_open("127.0.0.1", sl.port) and not tcp_open("127.0.0.1", sl.internal_port)
