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

import pytest

from flowerbed.config import RunSettings
from flowerbed.probes import free_port
from flowerbed.runner import check_result, follow, submit
from flowerbed.supernode.supervisor import NO_FORK, SUBPROCESS, SupernodeSpec, Supervisor
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for
from tests.procs import children

READY = "warm ClientApp executor ready"


def settings_for(running: RunningFederation, **changes: object) -> RunSettings:
    base = running.config.run.model_dump() | {"min_nodes": 2, "patience": 20, "node_wait_s": 120}
    return RunSettings.model_validate(base | changes)


@pytest.mark.federation
def test_a_task_that_dies_takes_only_its_fork_down(running: RunningFederation, tmp_path: Path) -> None:
    """SIGKILL to a running task (as the out-of-memory killer would): the executor goes on, and Flower
    answers the round with its "ClientApp crashed" error once the task's heartbeat lapses, as it did
    for a dead flwr-clientapp; the site trains the next rounds."""
    data = {s: running.data.site_files[s] for s in SITES[:2]}
    with supervised_sites(running.layout, running.gateway, data, tmp_path / "sites") as sups:
        site = SITES[0]
        assert wait_for(lambda: all(s.connected for s in sups.values()), 90)
        executor = sups[site].executor
        assert executor is not None and executor.pid is not None
        pid = executor.pid
        log = sups[site].log_path
        # Long enough local training to be caught running (1 site suffices for a round).
        settings = settings_for(running, max_rounds=3, min_nodes=1, local_epochs=400, round_timeout_s=120)
        handle = submit(running.layout, settings, name="crash")
        killed: list[int] = []

        def kill_running_task() -> None:
            for _ in range(3000):  # bounded: at most ~60 s
                tasks = children(pid)
                if tasks and "round 1: received a train task" in log.read_text():
                    os.kill(tasks[0], signal.SIGKILL)
                    killed.append(tasks[0])
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_running_task, daemon=True)
        killer.start()
        result = follow(running.layout, handle, timeout_s=400)
        killer.join(timeout=5)
        check_result(result, handle)
        assert killed, "no running task of the warm executor was seen"
        assert sups[site].executor is not None and sups[site].executor.pid == pid  # the same executor went on
        assert sups[site].restarts == 0
        text = log.read_text()
        assert READY in text
        assert f"died of SIGKILL (pid {killed[0]})" in text
        rows = [r for r in result.rows if r["kind"] == "train"]
        assert rows[0]["failures"] == 1 and site not in rows[0]["sites"], rows[0]
        assert rows[-1]["sites"] == sorted(SITES[:2]) or set(rows[-1]["sites"]) == set(SITES[:2]), rows


@pytest.mark.federation
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


def test_the_pull_after_a_reply_is_quick_then_flowers_own() -> None:
    """Every 0.25 s for 3 s after a reply, then 0.5, 1, 2 s, then Flower's 3 s (10 s after the reply)."""
    from flowerbed.supernode.node import FLOWER_IDLE_S, PullClock

    clock = PullClock(0.25)
    assert [clock.idle_sleep(t) for t in (0.0, 1.0, 2.9)] == [0.25, 0.25, 0.25]
    assert [clock.idle_sleep(t) for t in (3.3, 3.8, 4.8, 6.8)] == [0.5, 1.0, 2.0, 3.0]
    assert clock.idle_sleep(10.0) == FLOWER_IDLE_S


def test_object_pulls_retry_quickly_in_kit_processes() -> None:
    """Flower's readers retry an object that is not there yet after 1 s; the kit's after 0.05 s."""
    code = (
        "from flwr.supercore.inflatable import inflatable_utils as u\n"
        "from flowerbed.warmexec import quick_object_pulls\n"
        "print(u.pull_objects.__kwdefaults__['initial_backoff'])\n"
        "quick_object_pulls(cap_s=0.2)\n"
        "for f in (u.pull_objects, u.pull_and_inflate_object_from_tree):\n"
        "    print(f.__kwdefaults__['initial_backoff'], f.__kwdefaults__['backoff_cap'])\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["1", "0.05 0.2", "0.05 0.2"]


def _python(code: str) -> list[str]:
    """The output lines of ``code`` run in a fresh interpreter, after Flower's object-pull imports (each test
    changes process-wide defaults)."""
    import subprocess
    import sys

    head = (
        "import time\n"
        "from flwr.supercore.inflatable import inflatable_utils as u\n"
        "from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError\n"
        "from flowerbed.warmexec import quick_object_pulls\n"
    )
    done = subprocess.run([sys.executable, "-c", head + code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("\n")


def test_a_task_waits_for_its_objects_as_long_as_its_supernode_downloads_them() -> None:
    """Flower's reader gives up on an object after 500 tries; a task's tries are endless: a SuperNode still
    downloading over a link cut for minutes is waited for (a task that gave up left its SuperNode waiting
    for a reply forever), and an object its SuperNode deleted (its download failed) ends the task at once."""
    out = _python(
        "quick_object_pulls(cap_s=0.001, endless=True)\n"
        "tries = {'n': 0}\n"
        "def late(object_id):\n"
        "    tries['n'] += 1\n"
        "    if tries['n'] <= 700:\n"
        "        raise ObjectUnavailableError(object_id)\n"
        "    return b'content'\n"
        "print(u.pull_objects(['a'], late), tries['n'], u.pull_and_inflate_object_from_tree.__kwdefaults__"
        "['max_tries_per_object'])\n"
        "def gone(object_id):\n"
        "    raise ObjectPullError(object_id, 'the object could not be found.')\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    u.pull_objects(['b'], gone)\n"
        "except ObjectPullError:\n"
        "    print('gone after', round(time.monotonic() - start))\n"
    )
    assert out[:2] == ["{'a': b'content'} 701 None", "gone after 0"], out


def test_the_serverapp_waits_for_a_cut_upload_only_as_long_as_its_round() -> None:
    """Within the deadline's block a reply whose objects never come ends after the deadline, not after
    Flower's 2 h (in practice: the object-push session's 180 s); outside it, Flower's limit is back."""
    out = _python(
        "from flowerbed.flower.superexec import object_pull_deadline\n"
        "quick_object_pulls(cap_s=0.5)\n"
        "def never(object_id):\n"
        "    raise ObjectUnavailableError(object_id)\n"
        "start = time.monotonic()\n"
        "with object_pull_deadline(2.0):\n"
        "    try:\n"
        "        u.pull_objects(['a'], never)\n"
        "    except ObjectPullError as exc:\n"
        "        print(time.monotonic() - start, 'timeout' in str(exc))\n"
        "print(u.pull_objects.__kwdefaults__['max_time'])\n"
    )
    waited, said = out[0].split()
    assert 2.0 <= float(waited) < 10 and said == "True" and out[1] == "7200", out  # 2 s and the last back-off


def test_a_module_a_task_needed_is_imported_by_the_executor_for_the_tasks_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real forks run tasks as the executor launches them; one imports a module of LEARNED that the executor
    lacks (opacus, at a site without a budget of its own, by its first DP-SGD task): the executor imports
    it once, between polls, for the tasks after it."""
    import importlib
    import sys

    from flowerbed import warmexec

    monkeypatch.setattr(warmexec, "LEARNED", ("colorsys",))  # a module nothing here imported yet
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    executor = warmexec.ForkExecutor({})

    def task(needs: bool) -> None:  # a forked task; it ends with os._exit
        pid = os.fork()
        if pid == 0:
            runner = (lambda: importlib.import_module("colorsys") and None) if needs else (lambda: None)
            warmexec._child(runner, ["task"], executor.learn_pipe[1])
        os.waitpid(pid, 0)

    task(needs=False)
    assert executor.learn() == []  # a task that did not need it: nothing said, nothing imported
    assert "colorsys" not in sys.modules
    task(needs=True)
    assert executor.learn() == ["colorsys"]
    assert "colorsys" in sys.modules
    assert executor.learn() == []  # once


def test_the_executor_polls_quickly_only_while_tasks_come() -> None:
    """Ten times a second after the start and after a task starts or ends, slowing to once a second over RAMP_S
    (a site between rounds, a coordinator's long run: its ServerApp is the executor's task)."""
    from flowerbed.warmexec import IDLE_POLL_S, RAMP_S, ForkExecutor

    executor = ForkExecutor({})
    start = executor.last_task
    assert executor.poll_s(0.1, start) == 0.1
    assert 0.1 < executor.poll_s(0.1, start + RAMP_S / 2) < IDLE_POLL_S  # slowing down
    assert executor.poll_s(0.1, start + RAMP_S + 1) == IDLE_POLL_S  # idle: Flower's own once a second
    executor.children[1] = (7, start)  # a task starts: quick again ...
    assert executor.poll_s(0.1, start + 10 * RAMP_S) == 0.1
    assert executor.poll_s(0.1, start + 12 * RAMP_S) == IDLE_POLL_S  # ... and slow while it runs long
    executor.children.clear()  # it ended: the next round's task comes soon
    assert executor.poll_s(0.1, start + 12 * RAMP_S + 0.5) < 0.15
    assert executor.poll_s(0.1, start + 14 * RAMP_S) == IDLE_POLL_S
    assert executor.poll_s(2.0, start + 14 * RAMP_S) == 2.0  # a slower interval asked for is kept


def test_the_cli_starts_without_torch_or_flower() -> None:
    """`flowerbed --help` and quick commands need neither: they load where a command uses them."""
    import subprocess
    import sys

    code = "import sys, flowerbed.cli; print(sorted(m for m in ('torch', 'flwr', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
