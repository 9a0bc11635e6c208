"""Start and supervise the coordinator's processes: SuperLink, ServerApp executor, Fleet gateway."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from flowerbed import audit
from flowerbed.audit import AUDIT_ENV, GATEWAY_LOG_ENV
from flowerbed.certs.files import write_private
from flowerbed.certs.service import read_cert
from flowerbed.config import FederationConfig
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import grpc_health, presents_certificate, tcp_open
from flowerbed.proc import ManagedProcess, child_env, executable, kill_group, stop_all, tail
from flowerbed.superlink import control, flwrcli, gateway, sites
from flowerbed.superlink.launch import REPLIES_ENV
from flowerbed.superlink.refusals import RefusalWatch
from flowerbed.warmexec import can_fork

EXECUTOR = "ServerApp executor"
FLOWER_HINT = "reinstall flowerbed in this environment (`pip install flowerbed`), it brings Flower"
Report = Callable[[str], None]


def executor_command() -> list[str]:
    """The warm ServerApp executor (:mod:`flowerbed.superlink.warm`); Flower's own where fork is missing."""
    if can_fork():
        return [sys.executable, "-m", "flowerbed.superlink.warm"]
    return [executable("flower-superexec", FLOWER_HINT)]


@dataclass
class CoordinatorStack:
    """The running coordinator processes (stop them with :meth:`stop`)."""

    layout: FederationLayout
    config: FederationConfig
    processes: list[ManagedProcess] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    probes: dict[str, Callable[[], bool]] = field(default_factory=dict)  # readiness, by process name
    retired_groups: list[int] = field(default_factory=list)  # a dead executor's group: its ServerApp runs on

    @property
    def control_address(self) -> str:
        """The SuperLink's loopback address of its Control API."""
        return f"127.0.0.1:{self.config.superlink.internal_port}"

    def first_exited(self) -> ManagedProcess | None:
        """The first child that is no longer running, if any."""
        for proc in self.processes:
            if proc.poll() is not None:
                return proc
        return None

    def stop(self) -> None:
        """Stop every process of the stack by pid (and the groups of restarted ones)."""
        control.close_client(self.layout.flwr_home)  # an open connection holds the SuperLink's shutdown up
        stop_all(self.processes)
        for group in self.retired_groups:
            kill_group(group)
        self.layout.pidfile.unlink(missing_ok=True)
        with contextlib.suppress(OSError, FlowerbedError):  # a full disk must not keep the stack running
            audit.anchor_log(self.layout.audit, self.layout.gateway_access_log, "coordinator")


# glibc's malloc keeps freed memory in per-thread arenas and, once a large buffer was freed, serves the
# next ones from the heap instead of mmap: a SuperLink or ServerApp that moved 8 replies of 100 MB kept
# gigabytes it no longer used. A fixed mmap threshold gives every buffer of 256 kB or more back to the
# system when it is freed (glibc's documented tunables; other C libraries ignore them).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_ARENA_MAX": "2"}


def superlink_command() -> list[str]:
    """Flower's flower-superlink, started through :mod:`flowerbed.superlink.launch` (SQLite waits for locks)."""
    executable("flower-superlink", FLOWER_HINT)  # Flower is installed: a clear error if not
    return [sys.executable, "-m", "flowerbed.superlink.launch"]


def _check_pki(layout: FederationLayout) -> None:
    for path, fix in (
        (layout.ca_cert, "flowerbed certs init"),
        (layout.server_cert, "flowerbed certs server"),
        (layout.server_key, "flowerbed certs server"),
    ):
        if not path.is_file():
            raise FlowerbedError(f"{path} is missing: run `{fix}` first")
    cert = read_cert(layout.server_cert)
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise FlowerbedError(
            f"the server certificate {layout.server_cert} has expired: run `flowerbed certs renew-server`"
        )


def _secret(layout: FederationLayout) -> None:
    if not layout.superexec_secret.exists():
        write_private(layout.superexec_secret, secrets.token_hex(32).encode())


def start_stack(
    layout: FederationLayout,
    config: FederationConfig,
    *,
    deadline_s: float = 90,
    report: Report = lambda _msg: None,
) -> CoordinatorStack:
    """Start SuperLink, executor and gateway, register every site's key; all or nothing."""
    _check_pki(layout)
    nginx = gateway.find_nginx()
    _secret(layout)
    sl = config.superlink
    for port in (sl.internal_port, sl.health_port, sl.executor_health_port):
        if tcp_open("127.0.0.1", port):
            raise FlowerbedError(
                f"port {port} on 127.0.0.1 is in use (is another `flowerbed superlink start` running?); "
                "stop it or change the ports in federation.toml"
            )
    stack = CoordinatorStack(layout=layout, config=config)
    env = child_env(layout.flwr_home) | {AUDIT_ENV: str(layout.audit), GATEWAY_LOG_ENV: str(layout.gateway_access_log),
                                         REPLIES_ENV: str(layout.replies)} | MALLOC  # fmt: skip
    layout.logs.mkdir(parents=True, exist_ok=True)
    try:
        superlink = ManagedProcess(
            name="flower-superlink",
            argv=[
                *superlink_command(),
                "--ssl-ca-certfile", str(layout.ca_cert),
                "--ssl-certfile", str(layout.server_cert),
                "--ssl-keyfile", str(layout.server_key),
                "--host", "127.0.0.1",
                "--port", str(sl.internal_port),
                "--database", str(layout.database),
                "--disable-runtime-dependency-installation",
                "--enable-supernode-auth",
                "--isolation", "process",
                "--superexec-auth-secret-file", str(layout.superexec_secret),
                "--health-server-address", f"127.0.0.1:{sl.health_port}",
            ],
            log_path=layout.logs / "superlink.log",
            env=env,
            cwd=layout.state,
            die_with_parent=True,  # never an orphan holding the ports (a supervisor killed with SIGKILL)
        )  # fmt: skip
        stack.processes.append(superlink.start())
        report(f"starting flower-superlink on 127.0.0.1:{sl.internal_port} (pid {superlink.pid})")
        stack.probes[superlink.name] = lambda: grpc_health(f"127.0.0.1:{sl.health_port}")

        executor = ManagedProcess(
            name=EXECUTOR,
            argv=[
                *executor_command(),
                "--runtime-api-address", stack.control_address,
                "--root-certificates", str(layout.ca_cert),
                "--superexec-auth-secret-file", str(layout.superexec_secret),
                "--health-server-address", f"127.0.0.1:{sl.executor_health_port}",
            ],
            log_path=layout.logs / "serverapp-executor.log",
            env=env,
            cwd=layout.state,
            die_with_parent=True,
        )  # fmt: skip
        # Started together (the executor waits for the SuperLink's Runtime API by itself): their imports
        # overlap, seconds off every coordinator start.
        stack.processes.append(executor.start())
        report(f"starting the ServerApp executor (pid {executor.pid})")
        stack.probes[executor.name] = lambda: grpc_health(f"127.0.0.1:{sl.executor_health_port}")
        superlink.wait_ready(stack.probes[superlink.name], deadline_s)
        executor.wait_ready(stack.probes[executor.name], deadline_s)

        flwrcli.write_connection(layout.flwr_home, stack.control_address, layout.ca_cert)
        stack.registered = register_sites(layout, config, report)

        conf_prefix = layout.gateway
        gateway.render_config(
            conf_prefix,
            listen_host=sl.gateway_host,
            listen_port=sl.port,
            upstream_port=sl.internal_port,
            cert=layout.server_cert,
            key=layout.server_key,
            ca=layout.ca_cert,
            logs=layout.logs,
            idle_timeout_s=sl.idle_timeout_s,
        )
        gateway.validate(nginx, conf_prefix)
        probe_host = "127.0.0.1" if sl.gateway_host in ("0.0.0.0", "::") else sl.gateway_host  # noqa: S104
        if tcp_open(probe_host, sl.port):
            raise FlowerbedError(
                f"port {sl.port} on {sl.gateway_host} is already in use by another process: stop it "
                f"(`ss -ltnp 'sport = :{sl.port}'` names it) or change superlink.port in federation.toml"
            )
        ours = read_cert(layout.server_cert).public_bytes(serialization.Encoding.DER)
        gw = gateway.gateway_process(nginx, conf_prefix, layout.logs / "gateway.log")
        stack.processes.append(gw.start())
        report(f"starting the Fleet gateway on {sl.gateway_host}:{sl.port} (pid {gw.pid})")
        stack.probes[gw.name] = lambda: presents_certificate(probe_host, sl.port, layout.ca_cert, ours)
        gw.wait_ready(stack.probes[gw.name], deadline_s)
    except BaseException:
        stack.stop()
        raise
    _write_pidfile(stack)
    return stack


def register_sites(layout: FederationLayout, config: FederationConfig, report: Report) -> list[str]:
    """Register every site's public node key that the SuperLink does not know yet; unregister revoked ones."""
    for name in sites.unregister_pending(layout):
        report(f"unregistered the node key of revoked site {name}")
    revoked = {name for name, entry in sites.load_registry(layout).items() if entry.get("revoked")}
    registered = []
    for site in config.sites:
        if site.name in revoked:
            continue
        pub = layout.node_pub(site.name)
        if not pub.is_file():
            report(f"site {site.name}: no node key yet ({pub}); run `flowerbed kit build --site {site.name}`")
            continue
        if sites.register(layout, site.name) is not None:
            report(f"registered node key of site {site.name}")
        registered.append(site.name)
    return registered


def _write_pidfile(stack: CoordinatorStack) -> None:
    data = {
        "started": time.time(),
        "processes": {p.name: p.pid for p in stack.processes},
        "logs": str(stack.layout.logs),
    }
    stack.layout.pidfile.write_text(json.dumps(data, indent=2), encoding="utf-8")


def supervise(
    stack: CoordinatorStack,
    *,
    should_stop: Callable[[], bool],
    report: Report = lambda _msg: None,
    poll_s: float = 1.0,
    max_restarts: int = 5,
    window_s: float = 600.0,
    deadline_s: float = 90.0,
    on_idle: Callable[[], object] | None = None,
    refusals: RefusalWatch | None = None,
) -> None:
    """Block until ``should_stop``; a child that dies is restarted with backoff while the others run on.

    A dead gateway or SuperLink has its whole process group ended first (an orphaned nginx worker
    would hold the port); a dead executor's group is left running, because the ServerApp it started
    goes on with the run, and is ended when the coordinator stops. More than ``max_restarts`` deaths
    of one child within ``window_s`` is an error naming its log. ``on_idle`` runs at each quiet poll
    (the run keeper's tick: it resumes runs whose ServerApp died); ``refusals`` names node keys the
    SuperLink refused as unknown.
    """
    deaths: dict[str, list[float]] = {}
    while not should_stop():
        dead = stack.first_exited()
        if dead is None:
            if on_idle is not None:
                on_idle()
            for line in refusals.tick() if refusals is not None else []:
                report(line)
            time.sleep(poll_s)
            continue
        now = time.monotonic()
        recent = [t for t in deaths.get(dead.name, []) if now - t < window_s] + [now]
        deaths[dead.name] = recent
        code, why = dead.poll(), tail(dead.log_path, 2) or "no log lines"
        if len(recent) > max_restarts:
            raise FlowerbedError(
                f"{dead.name} died {len(recent)} times within {window_s:.0f} s (last status {code}); "
                f"see {dead.log_path}: {why}"
            )
        backoff = min(2.0 ** (len(recent) - 1), 30.0)
        report(f"{dead.name} exited with status {code} ({why}); restarting it in {backoff:.0f} s, the rest runs on")
        end = time.monotonic() + backoff
        while time.monotonic() < end and not should_stop():
            time.sleep(0.2)
        if should_stop():
            return
        if dead.name == EXECUTOR:
            stack.retired_groups.append(dead.pid)
        else:
            dead.stop()  # ends its process group too
        dead.start()
        dead.wait_ready(stack.probes[dead.name], deadline_s)
        _write_pidfile(stack)
        report(f"{dead.name} is back (pid {dead.pid})")
