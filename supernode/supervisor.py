"""Run flower-supernode outbound-only and keep it running, telling the site what happens.

The supervisor reads the SuperNode's output line by line (never the whole log again), writes it
to ``logs/supernode.log`` with a UTC timestamp on each line, and reports to the site's console:
connected, each task received with its round, each task that failed on this site's data and why,
and when the link to the gateway is down (naming the hop: DNS, TCP, the proxy, TLS) and back.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from flowerbed import audit
from flowerbed.audit import AUDIT_ENV, AUDIT_FILE
from flowerbed.certs.files import write_private
from flowerbed.certs.nodekeys import load_public_key, public_fingerprint
from flowerbed.clientapp.device import NVML_CHECK_ENV
from flowerbed.clientapp.privacy import node_config_of
from flowerbed.config import SitePrivacy
from flowerbed.deploy.firewall_checklist import MAX_AHEAD_S, MAX_BEHIND_S
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.proc import ManagedProcess, child_env, executable
from flowerbed.protocol import COMPRESSION_DIR_KEY, DEVICE_ENV, HE_DIR_KEY, SECURE_ONLY_KEY, SITE_FILE_ENV, TASK_EVENT
from flowerbed.supernode.gate import write_shim
from flowerbed.supernode.node import ALIVE_ENV, FLOWER_IDLE_S, PULL_ENV
from flowerbed.supernode.signoff import is_registered, sign_off
from flowerbed.warmexec import (
    DP_SITE_ENV,
    TASK_ENDED,
    TASK_STARTED,
    THREAD_VARS,
    THREADS_ENV,
    can_fork,
    task_threads,
)

CONNECTED = "SuperNode ID:"
ACTIVATION_FAILED = "Failed to activate SuperNode"
BAD_CERT = "CERTIFICATE_VERIFY_FAILED"
LINK_FAILED = "Connection attempt failed"
LINK_RESTORED = "Connection successful after"
PORT_TRIES = 3  # restarts that find the SuperNode's own port taken before giving up
DRIFT, REPORTED = "clock drift", "reported"  # what a diagnosis before a restart told the site
PORT_IN_USE = "address already in use"
ENDED_ITSELF = "SuperNode terminated gracefully"  # also Flower's answer to HTTP 401: it SIGINTs itself
RECEIVED, SENDING = "Received successfully", "Sending:"  # Flower took a task's message / sends its reply
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log lines even into a pipe
Report = Callable[[str], None]
LinkProbe = Callable[[], tuple[bool, str]]
ClockProbe = Callable[[], float | None]  # seconds this VM is ahead of the SuperLink's gateway
WARM, SUBPROCESS = "warm", "subprocess"  # how ClientApps start: forks of a warm executor, or Flower's way
NO_FORK = (
    "this system cannot fork (Windows): each task starts a new flwr-clientapp process, as in plain Flower, "
    "which adds seconds to every round"
)


def _no_probe() -> tuple[bool, str]:
    return True, ""


def _no_clock() -> float | None:
    return None


def stamp(when: float | None = None) -> str:
    """UTC time as written in front of every supernode.log line."""
    moment = dt.datetime.fromtimestamp(time.time() if when is None else when, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SupernodeSpec:
    """Everything one SuperNode needs."""

    site: str
    superlink: str
    ca: Path
    key: Path
    data: Path
    workdir: Path
    port: int = 9094
    extra_node_config: dict[str, str] = field(default_factory=dict)
    nice: int = 0  # a lower CPU priority for the SuperNode and its ClientApps (POSIX), e.g. on a shared host
    site_file: Path | None = None  # the kit's site.toml with the site's approvals (None: built-in tasks only)
    executor: str = WARM  # warm: tasks are forks of a process that imported torch once; subprocess: Flower's
    threads: int = 0  # torch threads per task; 0: this machine's cores (give 1 when sites share a host)
    device: str = "auto"  # site.toml device: where tasks train (flowerbed.clientapp.device)
    pull_s: float = 0.25  # after a reply, ask for the next task this often (3: Flower's own 3 s)
    privacy: SitePrivacy | None = None  # the site's own DP-SGD budget (site.toml [privacy]), given to every task
    secure_only: bool = False  # site.toml require_secure_aggregation: train only in runs with secure aggregation

    def __post_init__(self) -> None:
        # The SuperNode runs in its work folder: relative paths from the user's folder would break.
        for name in ("ca", "data", "workdir"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
        # The key keeps its own name: a link to another site's key is named as such by the preflight.
        object.__setattr__(self, "key", Path(self.key).expanduser().absolute())
        if self.site_file is not None:
            object.__setattr__(self, "site_file", Path(self.site_file).expanduser().resolve())

    @property
    def warm(self) -> bool:
        """Whether the warm executor runs the ClientApps (the supervisor falls back where fork is missing)."""
        return self.executor == WARM

    @property
    def audit_path(self) -> Path:
        """The site's hash-chained audit trail (the SuperNode's work folder)."""
        return self.workdir / AUDIT_FILE

    @property
    def secret_path(self) -> Path:
        """The key the warm executor signs its task requests with (Flower's SuperExec auth), made once."""
        path = self.workdir / "superexec.secret"
        if not path.exists():
            write_private(path, os.urandom(32).hex().encode())
        return path

    @property
    def he_dir(self) -> Path:
        """Where the site keeps its exchange key and the CKKS keys it holds (``ckks`` runs)."""
        return self.workdir / "he"

    @property
    def alive_path(self) -> Path:
        """Touched by the SuperNode's pull loop on each turn (see :mod:`flowerbed.supernode.node`)."""
        return self.workdir / "pull-loop.alive"

    def env(self) -> dict[str, str]:
        """The environment of the SuperNode and its executor: ClientApps start through the approval gate."""
        env = child_env(self.workdir / "flwr-home")
        shim = write_shim(self.workdir / "bin")
        env["PATH"] = os.pathsep.join([str(shim.parent), env["PATH"]])
        env[SITE_FILE_ENV] = str(self.site_file or "")
        env[AUDIT_ENV] = str(self.audit_path)
        # torch_threads = 0: FLOWERBED_TORCH_THREADS of this process's environment, else every core.
        count = str(self.threads if self.threads > 0 else task_threads())
        env[THREADS_ENV] = count
        env[PULL_ENV] = str(self.pull_s)
        env[DEVICE_ENV] = self.device
        env[DP_SITE_ENV] = "1" if self.privacy is not None else "0"  # the warm executor imports opacus up front
        env[NVML_CHECK_ENV] = "1"  # torch.cuda.is_available() without a CUDA context: the warm parent forks
        env[ALIVE_ENV] = str(self.alive_path)
        for name in THREAD_VARS:
            env[name] = count
        return env

    def executor_argv(self) -> list[str]:
        """The warm executor: Flower's flower-superexec flags, tasks forked (:mod:`flowerbed.supernode.warm`)."""
        return [
            sys.executable, "-m", "flowerbed.supernode.warm",
            "--insecure",  # the Runtime API on 127.0.0.1, requests signed with the secret below
            "--runtime-api-address", f"127.0.0.1:{self.port}",
            "--superexec-auth-secret-file", str(self.secret_path),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip

    def node_config(self) -> str:
        """Flower's ``--node-config`` string of this site (data path, site name, policies)."""
        items = {
            "data-path": str(self.data),
            "site-name": self.site,
            **node_config_of(self.privacy, self.workdir / "privacy"),
            HE_DIR_KEY: str(self.he_dir),
            COMPRESSION_DIR_KEY: str(self.workdir / "compression"),
            **({SECURE_ONLY_KEY: "true"} if self.secure_only else {}),
            **self.extra_node_config,
        }
        return " ".join(f'{k}="{v}"' for k, v in items.items())

    def supernode_command(self) -> list[str]:
        """Flower's flower-supernode, or its own main with the quick pull after each reply (``pull_s`` < 3)."""
        if self.pull_s < FLOWER_IDLE_S:
            return [sys.executable, "-m", "flowerbed.supernode.node"]
        return [executable("flower-supernode", "reinstall flowerbed in this environment")]

    def argv(self) -> list[str]:
        """The command line of ``flower-supernode`` for this site (its quick-pull entry point)."""
        lower = ["nice", "-n", str(self.nice)] if self.nice > 0 and shutil.which("nice") else []
        return [
            *lower,
            *self.supernode_command(),
            "--superlink", self.superlink,
            "--root-certificates", str(self.ca),
            "--auth-supernode-private-key", str(self.key),
            "--port", str(self.port),
            "--node-config", self.node_config(),
            *(["--isolation", "process", "--superexec-auth-secret-file", str(self.secret_path)] if self.warm else []),
        ]  # fmt: skip


@dataclass
class Attempt:
    """What one run of flower-supernode showed."""

    exit_code: int | None = None
    connected: bool = False
    rejected: bool = False
    bad_certificate: bool = False
    link_failures: int = 0
    last_link_failure: float = 0.0
    link_restored: float = 0.0
    tasks: int = 0
    failed_tasks: int = 0
    node_id: int | None = None
    port_in_use: bool = False  # its loopback API port was held by another process
    ended_itself: float | None = None  # when it logged a graceful end that nobody asked for
    last_line: float = field(default_factory=time.monotonic)  # when its log last said anything
    awaiting_since: float | None = None  # it took a message and waits for its reply (Flower: one at a time)
    tasks_running: int = 0  # task processes of the warm executor that have not ended
    last_task_end: float = 0.0

    def wedged_for(self, now: float) -> float:
        """Seconds the SuperNode has waited for a reply with no task process working on it (0: it is not)."""
        if self.awaiting_since is None or self.tasks_running > 0:
            return 0.0
        return now - max(self.awaiting_since, self.last_task_end)


class LogFollower:
    """Reads one process's output line by line, timestamps it into the log, and notes events."""

    def __init__(
        self, stream: IO[bytes], log_path: Path, attempt: Attempt, report: Report, superlink: str,
        *, audit: Path | None = None, lively: bool = True,
    ) -> None:  # fmt: skip
        self.audit = audit
        self.lively = lively  # its lines show the SuperNode alive (not the executor's)
        self.stream = stream
        self.log_path = log_path
        self.attempt = attempt
        self.report = report
        self.superlink = superlink
        self.node_id: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LogFollower:
        """Start following in a daemon thread; returns this follower."""
        self.thread.start()
        return self

    def _run(self) -> None:
        with self.log_path.open("ab") as log:
            for raw in iter(self.stream.readline, b""):
                line = ANSI.sub("", raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                log.write(f"{stamp()} {line}\n".encode())
                log.flush()
                self.on_line(line)

    def on_line(self, line: str) -> None:
        """Turn one SuperNode log line into state and, where a site researcher cares, a console line."""
        a = self.attempt
        if self.lively:
            a.last_line = time.monotonic()
        if CONNECTED in line and not a.connected:
            a.connected = True
            rest = line.split(CONNECTED, 1)[1].split()
            self.node_id = rest[0] if rest else "?"
            a.node_id = int(self.node_id) if self.node_id.isdigit() else None
            self.report(f"connected to {self.superlink} as node {self.node_id}")
            if self.audit is not None:
                audit.append(self.audit, audit.CONNECTED, "supernode", superlink=self.superlink, node_id=self.node_id)
        elif ACTIVATION_FAILED in line:
            a.rejected = True
        elif BAD_CERT in line:
            a.bad_certificate = True
        elif LINK_FAILED in line:
            a.link_failures += 1
            a.last_link_failure = time.monotonic()
        elif LINK_RESTORED in line:
            a.link_restored = time.monotonic()
        elif PORT_IN_USE in line:
            a.port_in_use = True
        elif ENDED_ITSELF in line:
            a.ended_itself = time.monotonic()
        elif RECEIVED in line:
            a.awaiting_since = a.awaiting_since or time.monotonic()
        elif SENDING in line:
            a.awaiting_since = None
        elif TASK_STARTED in line:
            a.tasks_running += 1
        elif TASK_ENDED in line:
            a.tasks_running = max(0, a.tasks_running - 1)
            a.last_task_end = time.monotonic()
        elif TASK_EVENT in line:
            event = line.split(TASK_EVENT, 1)[1].strip()
            if " received " in event:
                a.tasks += 1
            if " FAILED" in event:
                a.failed_tasks += 1
            self.report(event)


@dataclass
class Supervisor:
    """Keeps one SuperNode running.

    A SuperNode restarted right after a crash is refused for about a minute (the SuperLink still
    sees the old session), so a refusal is retried for ``rejected_window_s``; refused for longer,
    the key is not registered and the supervisor stops with that message instead of looping.
    ``link_probe`` checks the path to the gateway (through the proxy, as the SuperNode connects)
    when Flower reports failed connection attempts, and every ``link_check_every_s`` otherwise;
    its answer names the hop that failed.
    """

    spec: SupernodeSpec
    report: Report = lambda _msg: None
    rejected_window_s: float = 150.0
    silent_s: float = 60.0  # a connected SuperNode whose pull loop and log stood still this long is reported
    silence_reported: bool = False
    # A SuperNode that waits this long for a reply no task process works on is restarted. Longer than
    # Flower's own answer for a task that died holding its message (its heartbeat lapses: 2 x 30 s).
    wedged_s: float = 120.0
    max_backoff_s: float = 30.0
    healthy_after_s: float = 60.0
    link_probe: LinkProbe = _no_probe
    clock_probe: ClockProbe = _no_clock
    clock_recheck_s: float = 5.0  # while the clock is off, how often it is measured again
    ended_grace_s: float = 10.0  # a SuperNode that logged its own end is ended after this
    sign_off_crashed: bool = True  # deactivate a killed node's session so that its restart is accepted
    fork_available: bool = field(default_factory=can_fork)  # False: ClientApps start as Flower starts them
    link_probe_every_s: float = 5.0  # while the link is down or Flower reports failed attempts
    link_check_every_s: float = 30.0  # while all seems well: Flower says nothing of some failures
    process: ManagedProcess | None = None
    executor: ManagedProcess | None = None  # the warm ClientApp executor beside the SuperNode
    connected: bool = False
    restarts: int = 0
    node_id: int | None = None  # the last node id Flower gave this site's key
    unasked_exits: int = 0  # clean exits nobody asked for: Flower's answer to HTTP 401
    link_down_since: float | None = None
    last_probe: float = 0.0
    attempt: Attempt = field(default_factory=Attempt)

    @property
    def log_path(self) -> Path:
        """The SuperNode's log file at the site."""
        return self.spec.workdir / "logs" / "supernode.log"

    def _start(self) -> tuple[ManagedProcess, LogFollower]:
        for path, what in ((self.spec.key, "node key"), (self.spec.ca, "CA certificate")):
            if not path.is_file():  # gone since preflight: a restart would only crash in a loop
                raise FlowerbedError(
                    f"the {what} {path} is gone: restore it from the site kit and start again",
                    exit_code=ExitCode.PREFLIGHT_FAILED,
                )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.spec.env()
        self.attempt = Attempt()
        self.silence_reported = False
        proc, follower = self._launch(f"flower-supernode ({self.spec.site})", self.spec.argv(), env)
        self.process = proc
        self.executor = None
        if self.spec.warm:  # its task lines go to the same log and console
            self.executor, _ = self._launch(
                f"warm ClientApp executor ({self.spec.site})", self.spec.executor_argv(), env, lively=False
            )
        return proc, follower

    def _launch(
        self, name: str, argv: list[str], env: dict[str, str], *, lively: bool = True
    ) -> tuple[ManagedProcess, LogFollower]:
        """Start one process of this site; its output is read line by line into the site's log."""
        proc = ManagedProcess(name=name, argv=argv, log_path=self.log_path, env=env, cwd=self.spec.workdir, pipe=True)
        proc.start()
        assert proc.popen is not None and proc.popen.stdout is not None  # noqa: S101 - pipe=True
        follower = LogFollower(proc.popen.stdout, self.log_path, self.attempt, self.report, self.spec.superlink,
                               audit=self.spec.audit_path, lively=lively)  # fmt: skip
        return proc, follower.start()

    def _stop_executor(self) -> None:
        if self.executor is not None:
            self.executor.stop(grace_s=5)
            self.executor = None

    def _check_link(self, now: float) -> None:
        """Probe the path to the gateway; report when it goes down (naming the hop) and when it is back.

        Probed every ``link_probe_every_s`` while Flower reports failed attempts or the link is
        down, and every ``link_check_every_s`` otherwise (Flower is silent about some failures).
        """
        a = self.attempt
        if self.link_down_since is not None and a.link_restored > a.last_link_failure:
            self._report_back()
            return
        failing = a.link_failures > 0 and a.last_link_failure > a.link_restored and now - a.last_link_failure < 60
        every = self.link_probe_every_s if (failing or self.link_down_since is not None) else self.link_check_every_s
        if not (a.connected or failing) or now - self.last_probe < every:
            return
        self.last_probe = now
        ok, detail = self.link_probe()
        if not ok and self.link_down_since is None:  # confirm once: one lost handshake is no outage
            time.sleep(1.0)
            ok, detail = self.link_probe()
        if not ok and self.link_down_since is None:
            self.link_down_since = time.time()
            self.report(f"link to {self.spec.superlink} down since {stamp(self.link_down_since)}: {detail}")
        elif ok and self.link_down_since is not None:
            self._report_back()
        elif ok:
            a.link_failures = 0

    def _report_back(self) -> None:
        if self.link_down_since is not None:
            away = time.time() - self.link_down_since
            self.report(f"link to {self.spec.superlink} is back after {away:.0f} s")
        self.link_down_since = None
        self.attempt.link_failures = 0

    def _watch(self, proc: ManagedProcess, follower: LogFollower, should_stop: Callable[[], bool]) -> Attempt:
        while True:
            self.connected = self.attempt.connected
            self._remember_node(self.attempt.node_id)
            code = proc.poll()
            if self.executor is not None and code is None and (gone := self.executor.poll()) is not None:
                self.report(f"the warm ClientApp executor ended with status {gone}: restarting it with the SuperNode")
                proc.stop()
                code = proc.poll()
            if code is not None or should_stop():
                # The executor first: the SuperNode then answers the task it held with an error, and a round
                # waiting for this site ends at once (both at once left the round to its timeout).
                self._stop_executor()
                proc.stop()  # its group too: a leftover child (flower-superexec) holds the output pipe open
                follower.thread.join(timeout=5)
                self.attempt.exit_code = code
                self.connected = self.attempt.connected
                return self.attempt
            ended = self.attempt.ended_itself
            if ended is not None and time.monotonic() - ended > self.ended_grace_s:
                proc.stop(grace_s=5)  # it said it ended but hangs on (seen after HTTP 401): end it
                continue
            self._check_link(time.monotonic())
            self._check_silent(proc)
            self._check_wedged(proc)
            time.sleep(0.5)

    def _check_wedged(self, proc: ManagedProcess) -> None:
        """Restart a SuperNode that took a message whose task ended (or never started) without a reply.

        Flower 1.42's SuperNode waits for each message's reply before it asks for the next; a task that
        ended without one (it failed before it had the message in hand) leaves it waiting for ever,
        connected but deaf to every later round. Only with the warm executor, whose task lines say
        when a task runs.
        """
        if not self.spec.warm or self.executor is None:
            return
        waited = self.attempt.wedged_for(time.monotonic())
        if waited >= self.wedged_s:
            self.report(
                f"the SuperNode took a task {waited:.0f} s ago and no task process is working on it (Flower waits "
                "for its reply for ever): restarting the SuperNode"
            )
            self.attempt.awaiting_since = None
            proc.stop(grace_s=5)

    def _check_silent(self, proc: ManagedProcess) -> None:
        """Connected, the link up, yet neither its pull loop turned nor its log said anything for ``silent_s``: said.

        Reported, not restarted: on a slow link a push or pull can take long without a word from Flower,
        and a restart would lose that reply; the site's researcher restarts it if it stays silent.
        """
        if not self.attempt.connected or self.link_down_since is not None or self.silence_reported:
            return
        try:
            loop_idle = time.time() - self.spec.alive_path.stat().st_mtime
        except OSError:
            return  # not written yet (a SuperNode of its own, or just started)
        quiet = min(loop_idle, time.monotonic() - self.attempt.last_line)
        if quiet >= self.silent_s:
            self.silence_reported = True
            self.report(f"the SuperNode (pid {proc.pid}) has not asked the SuperLink for work for {quiet:.0f} s "
                        "although connected and the link is up, and logged nothing: if it stays silent, restart it "
                        "(Ctrl-C, then `flowerbed supernode start` again) and send the coordinator "
                        "logs/supernode.log")  # fmt: skip

    def _clock_off(self) -> tuple[float | None, bool]:
        """The measured offset (seconds ahead of the SuperLink) and whether Flower would refuse it."""
        offset = self.clock_probe()
        return offset, offset is not None and (offset > MAX_AHEAD_S or -offset > MAX_BEHIND_S)

    def _wait_for_clock(self, should_stop: Callable[[], bool], node_id: int | None) -> None:
        """Check the clock every ``clock_recheck_s`` until it is right again (or a stop).

        The node's own sign-off was refused while its clock was off, so the supervisor signs the
        old session off once the clock is right: the restart is then accepted at once.
        """
        while not should_stop():
            end = time.monotonic() + self.clock_recheck_s
            while time.monotonic() < end and not should_stop():
                time.sleep(0.2)
            offset, off = self._clock_off()
            if not off:
                measured = f"{offset:+.1f} s" if offset is not None else "not measured"
                if node_id is not None and self.sign_off_crashed:
                    sign_off(self.spec.superlink, self.spec.ca, self.spec.key, node_id)
                self.report(f"the clock is right again ({measured} against the SuperLink): restarting the SuperNode")
                return

    def _diagnose(self, attempt: Attempt, backoff: float) -> str | None:
        """Before each restart: sign a killed node off, and check the clock; what was reported.

        Flower answers HTTP 401 (a signature outside its time window, or a key it no longer
        knows) by ending the SuperNode as if Ctrl-C was pressed: a clean exit nobody asked for.
        """
        code = attempt.exit_code
        self._remember_node(attempt.node_id)
        unasked = attempt.ended_itself is not None
        killed = not unasked and code not in (0, None) and attempt.connected
        if killed and attempt.node_id is not None and self.sign_off_crashed:
            why = sign_off(self.spec.superlink, self.spec.ca, self.spec.key, attempt.node_id)
            self.report(
                f"flower-supernode ended with status {code} without signing off; "
                + (
                    f"signed node {attempt.node_id} off at the SuperLink, so it may rejoin at once"
                    if why is None
                    else f"signing it off failed ({why}): the SuperLink may refuse it for about a minute"
                )
            )
        self.unasked_exits = self.unasked_exits + 1 if unasked else 0
        offset, off = self._clock_off()  # on every restart: a clock can drift after the start
        if off and offset is not None:
            where = f"{offset:.0f} s ahead of" if offset > 0 else f"{-offset:.0f} s behind"
            self.report(
                f"clock drift: this VM's clock is {where} the SuperLink's (measured {offset:+.1f} s; Flower refuses "
                f"a node more than 5 s ahead or 300 s behind, HTTP 401): sync it with NTP (`timedatectl "
                f"set-ntp true`, or `w32tm /resync` on Windows); the SuperNode restarts once the clock is right "
                f"(checked every {self.clock_recheck_s:.0f} s)"
            )
            return DRIFT
        if self.unasked_exits >= 2:
            measured = f"{offset:+.1f} s" if offset is not None else "not measured"
            self.report(
                f"the SuperLink refused this node's signed requests (HTTP 401) {self.unasked_exits} times with "
                f"the clock within its window ({measured}): ask the coordinator whether the node key "
                f"{self.spec.key.name} was revoked; retrying in {backoff:.0f} s"
            )
            return REPORTED
        return None

    @property
    def node_id_path(self) -> Path:
        """Where the last node id Flower gave this site is kept (to sign it off after a crash)."""
        return self.spec.workdir / "node-id"

    def _remember_node(self, node_id: int | None) -> None:
        if node_id is not None and node_id != self.node_id:
            self.node_id = node_id
            self.node_id_path.write_text(str(node_id), encoding="utf-8")

    def _sign_off_previous(self) -> None:
        """A supervisor that was killed with its SuperNode (kill -9, power loss) left the session
        online at the SuperLink, which refuses the node for about a minute: sign it off first."""
        try:
            previous = int(self.node_id_path.read_text("utf-8").strip())
        except (OSError, ValueError):
            return
        self.node_id = previous
        if self.sign_off_crashed and sign_off(self.spec.superlink, self.spec.ca, self.spec.key, previous) is None:
            self.report(f"signed off node {previous}'s previous session, which ended without it: rejoining at once")

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Block until ``should_stop`` (then stop the SuperNode) or a fatal refusal (raises)."""
        backoff = 1.0
        first_refusal: float | None = None
        busy = 0
        self._sign_off_previous()
        if self.spec.warm and not self.fork_available:
            self.report(NO_FORK)
            self.spec = replace(self.spec, executor=SUBPROCESS)
        try:
            while not should_stop():
                proc, follower = self._start()
                started = time.monotonic()
                self.report(f"started flower-supernode (pid {proc.pid}); log: {self.log_path}")
                attempt = self._watch(proc, follower, should_stop)
                if should_stop():
                    break
                if attempt.bad_certificate:
                    raise FlowerbedError(
                        f"the SuperLink's certificate is not signed by {self.spec.ca}: use the CA "
                        "from this federation's kit (or a proxy intercepts TLS)",
                        exit_code=ExitCode.REJECTED,
                    )
                if attempt.rejected and not attempt.connected:
                    now = time.monotonic()
                    first_refusal = first_refusal or now
                    unknown = now == first_refusal and is_registered(self.spec.superlink, self.spec.ca,
                                                                     self.spec.key) is False  # fmt: skip
                    if unknown:
                        fingerprint = public_fingerprint(
                            load_public_key(self.spec.key.with_name(self.spec.key.name + ".pub"))
                        )
                        raise FlowerbedError(
                            f"the SuperLink does not know node key {self.spec.key.name} ({fingerprint}): it is not "
                            f"registered; ask the coordinator to register {self.spec.key.name}.pub (`flowerbed "
                            "superlink start` registers every site key in the federation)",
                            exit_code=ExitCode.REJECTED,
                        )
                    if now - first_refusal >= self.rejected_window_s:
                        raise FlowerbedError(
                            f"the SuperLink refused node key {self.spec.key.name} for "
                            f"{self.rejected_window_s:.0f} s: it is not registered; ask the "
                            f"coordinator to register {self.spec.key.name}.pub (`flowerbed "
                            "superlink start` registers every site key in the federation)",
                            exit_code=ExitCode.REJECTED,
                        )
                    left = self.rejected_window_s - (now - first_refusal)
                    # A countdown, not "restarting": Flower refuses a node that comes back within about
                    # a minute of a crash, while the SuperLink still sees its previous session.
                    self.report(
                        f"the SuperLink refuses this node for now (its previous session is still active "
                        f"there): retrying in {backoff:.0f} s, giving up in {left:.0f} s"
                    )
                else:
                    first_refusal = None
                if time.monotonic() - started >= self.healthy_after_s:
                    backoff = 1.0
                self.restarts += 1
                self.connected = False
                busy = busy + 1 if attempt.port_in_use else 0
                if busy >= PORT_TRIES:  # a leftover of an earlier SuperNode would have ended by now
                    port = self.spec.port
                    raise FlowerbedError(
                        f"port {port} on 127.0.0.1 is held by another process (`ss -ltnp 'sport = :{port}'` "
                        "names it): stop it, or give this SuperNode another port (--port, or supernode_port in "
                        "site.toml)",
                        exit_code=ExitCode.PREFLIGHT_FAILED,
                    )
                said = self._diagnose(attempt, backoff) if first_refusal is None else REPORTED
                if said == DRIFT:
                    self._wait_for_clock(should_stop, attempt.node_id or self.node_id)
                    backoff = 1.0
                    continue
                if said is None:
                    self.report(
                        f"flower-supernode exited with status {attempt.exit_code}; "
                        f"restarting in {backoff:.0f} s (see {self.log_path})"
                    )
                end = time.monotonic() + backoff
                while time.monotonic() < end and not should_stop():
                    time.sleep(0.2)
                backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            self._stop_executor()
            if self.process is not None:
                self.process.stop()
