"""Shared fixtures: a federation made by the kit, and one running coordinator stack per session."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowerbed.certs import service
from flowerbed.config import FederationConfig, load_federation, save_toml_model
from flowerbed.demodata import DemoData, make_demo_data
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port, free_ports, tcp_open
from flowerbed.superlink.stack import CoordinatorStack, start_stack
from flowerbed.supernode.supervisor import WARM, SupernodeSpec, Supervisor
from tests import durations, faults, procs

SITES = ["inst-a", "inst-b", "univ-hospital"]


def make_config(name: str = "test", sites: list[str] | None = None, **run: object) -> FederationConfig:
    """A loopback federation on free ports."""
    port, internal, health, executor_health = free_ports(4)
    return FederationConfig.model_validate(
        {
            "name": name,
            "superlink": {
                "address": "localhost",
                "sans": ["127.0.0.1"],
                "port": port,
                "gateway_host": "127.0.0.1",
                "internal_port": internal,
                "health_port": health,
                "executor_health_port": executor_health,
                # Far below the 60 s default: every run in the tests goes through a gateway that
                # closes idle connections between polls, as a NAT with a short idle cut would.
                "idle_timeout_s": 2,
            },
            "sites": [{"name": s} for s in (sites or SITES)],
            "run": {"num_features": 30, "min_nodes": 2, **run},
        }
    )


def make_federation(root: Path, config: FederationConfig) -> FederationLayout:
    layout = FederationLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    save_toml_model(layout.config, config)
    service.ensure_all(layout, config)
    return layout


def run_cli(
    *args: str, timeout: float = 300, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``flowerbed`` command as a user would (``env`` adds to the environment)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        # The console script, as users run it: `python -m` would put the working folder first on
        # sys.path, where a `flowerbed/` clone may sit.
        [str(Path(sys.executable).parent / "flowerbed"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded in time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Non-zero with the expected code, the message, and no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in " ".join(text.split()), f"{needle!r} not in:\n{text}"


@dataclass
class RunningFederation:
    layout: FederationLayout
    config: FederationConfig
    stack: CoordinatorStack
    data: DemoData

    @property
    def gateway(self) -> str:
        return f"localhost:{self.config.superlink.port}"


@contextmanager
def coordinator(layout: FederationLayout, config: FederationConfig | None = None) -> Iterator[CoordinatorStack]:
    """A real coordinator stack (SuperLink, executor, nginx gateway) for the block; stopped by pid after it,
    and checked gone (no process left, the gateway port closed)."""
    config = config or load_federation(layout.root)
    stack = start_stack(layout, config)
    try:
        yield stack
    finally:
        stack.stop()
        for proc in stack.processes:
            assert proc.poll() is not None, f"{proc.name} still running"


@pytest.fixture
def in_a_task() -> Iterator[None]:
    """Flower 1.42 stamps a new Message with the task's identity (run, node, task): this test's own."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: TaskIdentity.__dict__.get(f"_{name}") for name in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, f"_{name}", value)


@pytest.fixture(scope="session")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFederation]:
    """One real SuperLink + executor + nginx gateway for the tests that need a coordinator."""
    root = tmp_path_factory.mktemp("running")
    config = make_config("shared")
    layout = make_federation(root / "federation", config)
    data = make_demo_data(root / "data", SITES)
    stack = start_stack(layout, config)
    try:
        yield RunningFederation(layout, config, stack, data)
    finally:
        stack.stop()
        for proc in stack.processes:
            assert proc.poll() is not None, f"{proc.name} still running"
        assert not tcp_open("127.0.0.1", config.superlink.port)


_SECONDS: dict[str, float] = {}
_CPU: dict[str, float] = {}
_CPU_START: dict[str, durations.CpuMark] = {}
_STARTED = time.monotonic()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "federation: starts Flower, nginx or a proxy (real processes); `scripts/test.sh --quick` skips these"
    )
    config.addinivalue_line("markers", "solo: keeps both cores busy; scripts/test.sh runs these alone (conftest SOLO)")


# Tests that run alone, after the others (scripts/test.sh runs `-m "not solo"` on two workers, then
# `-m solo` one at a time): the tests that keep both cores busy (sixteen SuperNodes, a 60 MB model,
# the demo's five sites). Beside one of them, a test that waits for a round within seconds starved
# past its round timeout (a 137-row round took 90 s; on two workers, sites missed a 20 s round).
SOLO = ("tests/test_load.py", "tests/test_big_model.py", "tests/test_demo.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (it suffixes the node ids with them)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that run alone are marked ``solo`` (``SOLO``); longest work first, and a module's tests
    on one worker when they share a fixture.

    A module with a shared fixture is one unit of work, as long as its tests together; units go
    longest first (kept durations; a federation test not measured yet counts 60 s), the tests of a
    unit stay together in collection order. The order is the same in every pytest-xdist worker (it
    must be); scripts/test.sh keeps it (``--no-loadscope-reorder``).
    """
    seconds = durations.known()
    position = {id(item): i for i, item in enumerate(items)}
    group: dict[int, str] = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs is not None and any(
            d.scope == "module" for fixturedefs in defs.name2fixturedefs.values() for d in fixturedefs
        )
        if item.nodeid.startswith(SOLO):
            item.add_marker(pytest.mark.solo)
        if shared:  # a module-scoped fixture (a coordinator, a federation) is made once, on one worker
            group[id(item)] = item.module.__name__ if item.module else item.nodeid
        if id(item) in group:
            item.add_marker(pytest.mark.xdist_group(group[id(item)]))

    def cost(item: pytest.Item) -> float:
        return seconds.get(item.nodeid, 60.0 if item.get_closest_marker("federation") else 1.0)

    unit_cost: dict[str, float] = {}
    unit_first: dict[str, int] = {}
    for item in items:
        unit = group.get(id(item), item.nodeid)
        unit_cost[unit] = unit_cost.get(unit, 0.0) + cost(item)
        unit_first.setdefault(unit, position[id(item)])

    def order(item: pytest.Item) -> tuple[float, int, int]:
        unit = group.get(id(item), item.nodeid)
        return -unit_cost[unit], unit_first[unit], position[id(item)]

    if hasattr(config, "workerinput"):  # a pytest-xdist worker; one process keeps the collection order
        items.sort(key=order)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start anything
def pytest_runtest_setup(item: pytest.Item) -> None:
    _CPU_START[item.nodeid] = durations.cpu_mark(procs.cpu_below(os.getpid()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """The CPU a test used, setup to teardown, goes with its teardown report to the controller."""
    yield
    start = _CPU_START.pop(item.nodeid, None)
    if start is not None:
        spent = durations.cpu_spent(start, durations.cpu_mark(procs.cpu_below(os.getpid())))
        item.user_properties.append(("cpu_s", round(spent, 2)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call", "teardown"):  # with xdist, the controller sees every worker's reports
        nodeid = report.nodeid.split("@", 1)[0]  # without pytest-xdist's "@group" suffix
        _SECONDS[nodeid] = _SECONDS.get(nodeid, 0.0) + report.duration
        for key, value in report.user_properties if report.when == "teardown" else ():
            if key == "cpu_s":
                _CPU[nodeid] = float(value)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller only (pytest-xdist)
        faults.RECORDS.unlink(missing_ok=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):
        faults.merge_records()  # docs/reliability.md from the fault tests that ran
        if _SECONDS:
            workers = int(getattr(session.config.option, "numprocesses", 0) or 0) or 1
            selection = session.config.option.markexpr or "whole suite"
            durations.keep(_SECONDS, time.monotonic() - _STARTED, workers, f"-m {selection!r}"
                           if session.config.option.markexpr else selection, _CPU)  # fmt: skip


@contextmanager
def supervised_sites(
    layout: FederationLayout,
    gateway: str,
    data: dict[str, Path],
    work: Path,
    *,
    nice: int = 0,
    max_backoff_s: float = 30.0,
    site_files: dict[str, Path] | None = None,
    executor: str = WARM,
    secure_only: frozenset[str] = frozenset(),
) -> Iterator[dict[str, Supervisor]]:
    """One real SuperNode per site, each under its supervisor in a thread; all stopped on exit.

    ``site_files``: a site's site.toml with its approvals (as a kit holds it). The sites share this
    machine, so each task gets one torch thread. ``secure_only``: sites that train only under secure
    aggregation (site.toml ``require_secure_aggregation``).
    """
    stop = threading.Event()
    threads, supervisors = [], {}
    try:
        for site, path in data.items():
            spec = SupernodeSpec(site=site, superlink=gateway, ca=layout.ca_cert, key=layout.node_key(site),
                                 data=path, workdir=work / site, port=free_port(), nice=nice,
                                 site_file=(site_files or {}).get(site), executor=executor,
                                 threads=1, secure_only=site in secure_only)  # fmt: skip
            supervisors[site] = Supervisor(spec, max_backoff_s=max_backoff_s)
            threads.append(threading.Thread(target=supervisors[site].run, args=(stop.is_set,), daemon=True))
            threads[-1].start()
        yield supervisors
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
