"""Sixteen SuperNodes on one coordinator (this 2-core machine), three rounds: no reply lost, no HTTP 500.

Real SuperLink, executor and nginx gateway, 16 real `flower-supernode` processes under their
supervisors, all on loopback. The figures (coordinator memory, open gateway connections, round
times) go to docs/reliability.md. The sites run at a lower CPU priority: on separate VMs they would
not take the coordinator's cores, and on one 2-core machine 16 ClientApps starting at once would
otherwise starve the SuperLink's database transactions (Flower's SQLite waits 5 s for a lock).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from benchmarks.common import rss_mb
from flowerbed.config import RunSettings
from flowerbed.demodata import make_demo_data
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, coordinator, make_config, make_federation, supervised_sites, wait_for
from tests.faults import record

COUNT = 16


def established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return len([line for line in out.splitlines() if line.strip()])


@pytest.mark.federation
def test_sixteen_sites_on_one_coordinator(tmp_path: Path) -> None:
    names = [f"site-{i:02d}" for i in range(COUNT)]
    config = make_config("load", names, min_nodes=COUNT)
    layout = make_federation(tmp_path / "fed", config)
    demo = make_demo_data(tmp_path / "demo", SITES)
    files = {}
    for i, name in enumerate(names):
        files[name] = tmp_path / "data" / f"{name}.csv"
        files[name].parent.mkdir(exist_ok=True)
        shutil.copy(demo.site_files[SITES[i % len(SITES)]], files[name])
    gateway = f"localhost:{config.superlink.port}"
    with coordinator(layout, config) as stack:
        with supervised_sites(layout, gateway, files, tmp_path, nice=10):
            settings = RunSettings.model_validate(
                config.run.model_dump()
                | {"min_nodes": COUNT, "max_rounds": 3, "patience": 10, "round_timeout_s": 600, "node_wait_s": 300}
            )
            handle = submit(layout, settings, name="sixteen")
            coordinator_pids = [p.pid for p in stack.processes if p.pid is not None]
            peak_rss, peak_conns = 0.0, 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak_rss, peak_conns
                for _ in range(2000):  # bounded: at most ~2000 s
                    if done.is_set():
                        return
                    peak_rss = max(peak_rss, rss_mb(coordinator_pids))
                    peak_conns = max(peak_conns, established(config.superlink.port))
                    time.sleep(1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            result = follow(layout, handle, timeout_s=1500)
            done.set()
            sampler.join(timeout=5)
            check_result(result, handle)
            rows = [r for r in result.rows if r["kind"] == "train"]
            assert [r["nodes"] for r in rows] == [COUNT] * 3, rows  # every reply of every round
            assert all(r["failures"] == 0 for r in rows), rows
            superlink_log = (layout.logs / "superlink.log").read_text()
            assert "database is locked" not in superlink_log
            access = (layout.logs / "gateway-access.log").read_text().splitlines()
            assert not [line for line in access if '" 500 ' in line or '" 502 ' in line], "HTTP 5xx at the gateway"
            assert peak_conns <= 4 * COUNT, peak_conns  # bounded: pooled keep-alive connections per node
            assert peak_rss < 2000, peak_rss  # MB: SuperLink, executor, ServerApp and nginx together
            record(f"{COUNT} SuperNodes on one 2-core coordinator, 3 rounds", "all rounds with every site's reply",
                   injected=f"{COUNT} sites on loopback (sites at nice 10)", noticed_s=None,
                   recovered_s=None, rounds_lost=0, replies_lost=0, seconds_total=round(time.monotonic() - started),
                   round_s="/".join(f"{r['seconds']:.0f}" for r in rows), coordinator_peak_pss_mb=round(peak_rss),
                   gateway_connections_peak=peak_conns)  # fmt: skip

    assert wait_for(lambda: established(config.superlink.port) == 0, 30)
