"""The warm ClientApp executor, with real SuperNodes, a real coordinator and real tasks.

A task whose process dies takes only its fork down (the executor and the run go on, as a dead
flwr-clientapp did before); a SuperNode restart brings a new executor; Flower's own subprocess
isolation stays available and is what a system without fork gets, with a warning.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from flowerbed.config import RunSettings
from flowerbed.probes import free_port
from flowerbed.runner import check_result, follow, submit
from flowerbed.supernode.supervisor import NO_FORK, SUBPROCESS, SupernodeSpec, Supervisor
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for

READY = "warm ClientApp executor ready"


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def settings_for(running: RunningFederation, **changes: object) -> RunSettings:
    base = running.config.run.model_dump() | {"min_nodes": 2, "patience": 20, "node_wait_s": 120}
    return RunSettings.model_validate(base | changes)


def test_a_task_that_dies_takes_only_its_fork_down(running: RunningFederation, tmp_path: Path) -> None:
    data = {s: running.data.site_files[s] for s in SITES[:2]}
    with supervised_sites(running.layout, running.gateway, data, tmp_path / "sites") as sups:
        site = SITES[0]
        assert wait_for(lambda: all(s.connected for s in sups.values()), 90)
        executor = sups[site].executor
        assert executor is not None and executor.pid is not None
        pid = executor.pid
        handle = submit(running.layout, settings_for(running, max_rounds=4, round_timeout_s=20), name="crash")
        killed: list[int] = []

        def kill_first_task() -> None:
            for _ in range(3000):  # bounded: at most ~60 s
                tasks = children(pid)
                if tasks:
                    os.kill(tasks[0], signal.SIGKILL)
                    killed.append(tasks[0])
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_first_task, daemon=True)
        killer.start()
        result = follow(running.layout, handle, timeout_s=300)
        killer.join(timeout=5)
        check_result(result, handle)
        assert killed, "no task of the warm executor was seen"
        assert sups[site].executor is not None and sups[site].executor.pid == pid  # the same executor went on
        assert sups[site].restarts == 0
        log = sups[site].log_path.read_text()
        assert READY in log
        assert f"died of SIGKILL (pid {killed[0]})" in log
        # As with a dead flwr-clientapp: no reply, so the round waits out round-timeout-s and runs again.
        waiting = [r for r in result.rows if r["kind"] == "waiting"]
        assert waiting and "no reply before round-timeout-s" in str(waiting[0]["errors"]), result.rows
        rows = [r for r in result.rows if r["kind"] == "train"]
        assert [r["nodes"] for r in rows] == [2, 2, 2, 2], rows  # the site trained again after its task was killed


def test_subprocess_isolation_and_no_fork_fallback_train_too(running: RunningFederation, tmp_path: Path) -> None:
    """Flower's own per-task processes: by choice (executor = "subprocess") or where fork is missing."""
    stop = threading.Event()
    said: list[str] = []
    specs = []
    for site, executor in ((SITES[0], SUBPROCESS), (SITES[1], "warm")):
        specs.append(
            SupernodeSpec(
                site=site, superlink=running.gateway, ca=running.layout.ca_cert, key=running.layout.node_key(site),
                data=running.data.site_files[site], workdir=tmp_path / site, port=free_port(), threads=1,
                executor=executor,
            )
        )  # fmt: skip
    sups = [Supervisor(specs[0]), Supervisor(specs[1], report=said.append, fork_available=False)]
    threads = [threading.Thread(target=s.run, args=(stop.is_set,), daemon=True) for s in sups]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: all(s.connected for s in sups), 90)
        assert NO_FORK in said
        assert all(s.executor is None and s.spec.executor == SUBPROCESS for s in sups)
        handle = submit(running.layout, settings_for(running, max_rounds=2), name="plain")
        result = follow(running.layout, handle, timeout_s=300)
        check_result(result, handle)
        assert [r["nodes"] for r in result.rows if r["kind"] == "train"] == [2, 2]
        for sup in sups:
            log = sup.log_path.read_text()
            assert READY not in log and "round 2: trained on" in log
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
