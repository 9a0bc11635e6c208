"""The federations the benchmarks time: the kit on loopback, plain Flower by hand, and the simulation engine.

Each one runs the demo's tabular task (breast-cancer CSVs made offline, MLP) on three sites and returns the
wall time of each round as its ServerApp saw it. Every process started here is stopped by pid.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from flowerbed.certs import service
from flowerbed.config import FederationConfig, RunSettings, Site, save_toml_model
from flowerbed.demo import SiteThreads, demo_config, demo_settings
from flowerbed.demodata import DemoData, make_demo_data
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port, tcp_open
from flowerbed.proc import ManagedProcess, child_env, executable
from flowerbed.runner import check_result, follow, submit
from flowerbed.superlink.stack import CoordinatorStack, start_stack
from flowerbed.supernode.supervisor import SupernodeSpec

PLAIN_APP = Path(__file__).resolve().parent / "plainapp"
SITES = ["inst-a", "inst-b", "univ-hospital"]


def settings(rounds: int, **changes: object) -> RunSettings:
    """The demo's tabular recipe, run for exactly ``rounds`` rounds (no early stop)."""
    return recipe("breast-cancer", rounds, **changes)


def recipe(data_set: str, rounds: int, **changes: object) -> RunSettings:
    """The demo's recipe for ``data_set``, run for exactly ``rounds`` rounds (no early stop)."""
    base = demo_settings(data_set).model_dump()
    stop_never = {"max_rounds": rounds, "target_value": None, "patience": 10000, "time_budget_s": 36000}
    return RunSettings.model_validate(base | stop_never | changes)


def data(folder: Path) -> DemoData:
    return make_demo_data(folder, SITES)


@dataclass
class Kit:
    """A kit federation: certificates, SuperLink + warm ServerApp executor + nginx, supervised SuperNodes."""

    root: Path
    layout: FederationLayout
    config: FederationConfig
    stack: CoordinatorStack
    sites: SiteThreads
    started_s: float

    def run(self, run_settings: RunSettings, name: str) -> list[float]:
        handle = submit(self.layout, run_settings, name=name)
        result = follow(self.layout, handle, timeout_s=1800)
        check_result(result, handle)
        return [float(r["seconds"]) for r in result.rows if r["kind"] == "train"]


@contextmanager
def kit(
    root: Path,
    demo: DemoData,
    sites: list[str] | None = None,
    executor: str = "warm",
    torch_threads: int = 1,
    *,
    data_set: str = "breast-cancer",
    route: Callable[[str, str], str] | None = None,
    direct: bool = False,
) -> Iterator[Kit]:
    """Start a kit federation of ``sites`` (default: the three demo sites) in ``root``; stop it on exit.
    ``data_set``: the demo whose recipe the federation.toml holds (``demo`` must be its data); ``route``:
    the address a site reaches the gateway at, given its name and the gateway's (default: the gateway's);
    ``direct``: the sites skip the gateway and reach the SuperLink's loopback port (one TLS hop, benchmarks)."""
    started = time.monotonic()
    names = sites or SITES
    layout = FederationLayout(root / "federation")
    layout.root.mkdir(parents=True, exist_ok=True)
    config = demo_config(free_port(), data_set)
    config = config.model_copy(update={"sites": [Site(name=n) for n in names]})
    save_toml_model(layout.config, config)
    service.ensure_all(layout, config)
    stack = start_stack(layout, config)
    threads = SiteThreads()
    try:
        port = config.superlink.internal_port if direct else config.superlink.port
        address = f"{config.superlink.address}:{port}"
        files = list(demo.site_files.values())
        threads.start(
            [
                SupernodeSpec(
                    site=n,
                    superlink=route(n, address) if route is not None else address,
                    ca=layout.ca_cert,
                    key=layout.node_key(n),
                    data=files[i % len(files)],
                    workdir=root / "sites" / n,
                    port=free_port(),
                    threads=torch_threads,
                    executor=executor,
                )
                for i, n in enumerate(names)
            ],
            lambda _msg: None,
        )
        deadline = time.monotonic() + 180
        while not all(s.connected for s in threads.supervisors) and time.monotonic() < deadline:
            if threads.errors:
                break
            time.sleep(0.2)
        if not all(s.connected for s in threads.supervisors):
            raise RuntimeError(f"the sites did not connect within 180 s: {threads.errors or 'no error reported'}")
        yield Kit(root, layout, config, stack, threads, time.monotonic() - started)
    finally:
        threads.stop()
        stack.stop()


def _app_dir(root: Path, config: dict[str, object], name: str = "plainbench") -> Path:
    """A Flower App folder: plain FedAvg ServerApp, flowerbed's ClientApp (same task and data).

    Flower accepts only run-config keys the app declares: ``config`` is declared as its defaults.
    """
    app = root / "app"
    app.mkdir(parents=True, exist_ok=True)
    for module in ("plain_server.py", "plain_client.py"):
        shutil.copy(PLAIN_APP / module, app / module)
    (app / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plain_server:app"
clientapp = "plain_client:app"

"""
        + tomli_w.dumps({"tool": {"flwr": {"app": {"config": config}}}}),
        encoding="utf-8",
    )
    return app


@dataclass
class Plain:
    """Plain Flower 1.42 started by hand: ``flower-superlink --insecure`` and ``flower-supernode --insecure``."""

    root: Path
    port: int
    processes: list[ManagedProcess]
    started_s: float

    def run(self, run_settings: RunSettings, name: str) -> list[float]:
        times_file = self.root / f"{name}-times.json"
        config = run_settings.to_run_config() | {"times-file": str(times_file)}
        home = self.root / "flwr-home"
        cwd = home / "cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        args = [executable("flwr", "install flwr"), "run", str(_app_dir(self.root, config)), "bench", "--format",
                "json"]  # fmt: skip
        out = subprocess.run(args, capture_output=True, text=True, env=child_env(home), cwd=cwd, check=False,
                             timeout=300)  # fmt: skip
        if out.returncode != 0 or '"success": false' in out.stdout:
            raise RuntimeError(f"flwr run failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        deadline = time.monotonic() + 1800
        times: list[float] = []
        while time.monotonic() < deadline:
            if times_file.exists():
                times = json.loads(times_file.read_text() or "[]")
                if len(times) > run_settings.max_rounds:
                    break
            time.sleep(0.5)
        return [b - a for a, b in itertools.pairwise(times)]


@contextmanager
def plain(root: Path, demo: DemoData, sites: int = 3, *, tls: FederationLayout | None = None) -> Iterator[Plain]:
    """Plain Flower with its defaults (no TLS, state in memory); with ``tls``, as a kit's SuperLink is run: TLS
    with that federation's certificates and the state in an SQLite file (still no node auth, no gateway)."""
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{tls.ca_cert}"' if tls else "insecure = true"
    host = "localhost" if tls else "127.0.0.1"  # the name in the kit's server certificate
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "{host}:{port}"\n{security}\n',
        encoding="utf-8",
    )
    env = child_env(home)
    processes: list[ManagedProcess] = []
    link_tls = ["--insecure"]
    node_tls = ["--insecure"]
    if tls:
        link_tls = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile",
                    str(tls.server_key), "--database", str(root / "state.db")]  # fmt: skip
        node_tls = ["--root-certificates", str(tls.ca_cert)]
    try:
        link_exe = executable("flower-superlink", "install flwr")
        argv = [link_exe, *link_tls, "--host", "127.0.0.1", "--port", str(port)]
        link = ManagedProcess("flower-superlink (plain)", argv, log_path=root / "superlink.log", env=env, cwd=root)
        processes.append(link.start())
        link.wait_ready(lambda: tcp_open("127.0.0.1", port), 60)
        files = list(demo.site_files.values())
        for i in range(sites):
            node_config = f'data-path="{files[i % len(files)]}" site-name="plain-{i}"'
            argv = [executable("flower-supernode", "install flwr"), *node_tls, "--superlink", f"{host}:{port}",
                    "--port", str(free_port()), "--node-config", node_config]  # fmt: skip
            node = ManagedProcess(f"flower-supernode (plain {i})", argv, log_path=root / f"supernode-{i}.log",
                                  env=child_env(root / f"home-{i}"), cwd=root)  # fmt: skip
            processes.append(node.start())
        yield Plain(root, port, processes, time.monotonic() - started)
    finally:
        for proc in reversed(processes):
            proc.stop(grace_s=5)


def simulation(root: Path, demo: DemoData, run_settings: RunSettings, sites: int = 3) -> list[float]:
    """Flower's simulation engine (Ray) in a child process: the same apps, in one machine's memory."""
    root.mkdir(parents=True, exist_ok=True)
    times_file = root / "sim-times.json"
    files = list(demo.site_files.values())
    env = child_env(root / "flwr-home") | {
        "BENCH_TIMES_FILE": str(times_file),
        "BENCH_DATA_FILES": ",".join(str(files[i % len(files)]) for i in range(sites)),
        "BENCH_RUN_CONFIG": json.dumps(run_settings.to_run_config()),
        "PYTHONPATH": os.pathsep.join([str(PLAIN_APP), os.environ.get("PYTHONPATH", "")]),
        "RAY_DEDUP_LOGS": "0",
    }
    code = (
        "from flwr.simulation import run_simulation\n"
        "import plain_server, plain_client\n"
        f"run_simulation(plain_server.app, plain_client.app, num_supernodes={sites}, "
        "backend_config={'client_resources': {'num_cpus': 1, 'num_gpus': 0.0}, 'init_args': {'num_cpus': 2}})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=1800, check=False)  # fmt: skip
    if out.returncode != 0 or not times_file.exists():
        raise RuntimeError(f"the simulation failed: {out.stderr[-800:]}")
    times = json.loads(times_file.read_text())
    return [b - a for a, b in itertools.pairwise(times)]


def compute_floor(demo: DemoData, run_settings: RunSettings, rounds: int, sites: int = 3) -> list[float]:
    """Train + evaluate of every site in this process, one after the other: no Flower, no messages."""
    import torch

    from flowerbed.protocol import task_name
    from flowerbed.task import load_task, task_config

    task = load_task(task_name(run_settings))
    config = task_config(task, run_settings.to_run_config())
    files = list(demo.site_files.values())
    global_model = task.model(config)
    out = []
    for _ in range(rounds):
        start = time.monotonic()
        states = []
        for i in range(sites):
            train_data, validation = task.load_data(files[i % len(files)], config)
            model = task.model(config)
            model.load_state_dict(global_model.state_dict())
            task.evaluate(model, validation, config)
            task.train(model, train_data, config)
            states.append(model.state_dict())
        global_model.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]})
        out.append(time.monotonic() - start)
    return out
