"""Run flower-supernode outbound-only and keep it running: restart with backoff, stop on a refusal."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.proc import ManagedProcess, child_env, executable

CONNECTED = "SuperNode ID:"
ACTIVATION_FAILED = "Failed to activate SuperNode"
BAD_CERT = "CERTIFICATE_VERIFY_FAILED"
Report = Callable[[str], None]


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

    def node_config(self) -> str:
        items = {"data-path": str(self.data.resolve()), "site-name": self.site, **self.extra_node_config}
        return " ".join(f'{k}="{v}"' for k, v in items.items())

    def argv(self) -> list[str]:
        return [
            executable("flower-supernode", "reinstall flowerbed in this environment"),
            "--superlink", self.superlink,
            "--root-certificates", str(self.ca.resolve()),
            "--auth-supernode-private-key", str(self.key.resolve()),
            "--port", str(self.port),
            "--node-config", self.node_config(),
        ]  # fmt: skip


@dataclass
class Attempt:
    """What one run of flower-supernode showed in its log."""

    exit_code: int | None
    connected: bool
    rejected: bool
    bad_certificate: bool


def read_new(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


@dataclass
class Supervisor:
    """Keeps one SuperNode running.

    A SuperNode restarted right after a crash is refused for about a minute (the SuperLink still
    sees the old session), so a refusal is retried for ``rejected_window_s``; refused for longer,
    the key is not registered and the supervisor stops with that message instead of looping.
    """

    spec: SupernodeSpec
    report: Report = lambda _msg: None
    rejected_window_s: float = 150.0
    max_backoff_s: float = 30.0
    healthy_after_s: float = 60.0
    process: ManagedProcess | None = None
    connected: bool = False
    restarts: int = 0

    @property
    def log_path(self) -> Path:
        return self.spec.workdir / "logs" / "supernode.log"

    def _start(self) -> tuple[ManagedProcess, int]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = ManagedProcess(
            name=f"flower-supernode ({self.spec.site})",
            argv=self.spec.argv(),
            log_path=self.log_path,
            env=child_env(self.spec.workdir / "flwr-home"),
            cwd=self.spec.workdir,
        )
        self.process = proc.start()
        return proc, offset

    def _watch(self, proc: ManagedProcess, offset: int, should_stop: Callable[[], bool]) -> Attempt:
        seen = ""
        while True:
            seen += read_new(self.log_path, offset + len(seen.encode()))
            if CONNECTED in seen and not self.connected:
                self.connected = True
                node_id = seen.split(CONNECTED, 1)[1].split()[0]
                self.report(f"connected to {self.spec.superlink} as node {node_id}")
            code = proc.poll()
            if code is not None or should_stop():
                return Attempt(code, CONNECTED in seen, ACTIVATION_FAILED in seen, BAD_CERT in seen)
            time.sleep(0.5)

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Block until ``should_stop`` (then stop the SuperNode) or a fatal refusal (raises)."""
        backoff = 1.0
        first_refusal: float | None = None
        try:
            while not should_stop():
                proc, offset = self._start()
                started = time.monotonic()
                self.report(f"started flower-supernode (pid {proc.pid}); log: {self.log_path}")
                attempt = self._watch(proc, offset, should_stop)
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
                    if now - first_refusal >= self.rejected_window_s:
                        raise FlowerbedError(
                            f"the SuperLink refused node key {self.spec.key.name} for "
                            f"{self.rejected_window_s:.0f} s: it is not registered; ask the "
                            f"coordinator to register {self.spec.key.name}.pub (`flowerbed "
                            "superlink start` registers every site key in the federation)",
                            exit_code=ExitCode.REJECTED,
                        )
                    self.report("the SuperLink refused this node for now (a previous session may "
                                "still be active); retrying")  # fmt: skip
                else:
                    first_refusal = None
                if time.monotonic() - started >= self.healthy_after_s:
                    backoff = 1.0
                self.restarts += 1
                self.connected = False
                self.report(
                    f"flower-supernode exited with status {attempt.exit_code}; "
                    f"restarting in {backoff:.0f} s (see {self.log_path})"
                )
                end = time.monotonic() + backoff
                while time.monotonic() < end and not should_stop():
                    time.sleep(0.2)
                backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            if self.process is not None:
                self.process.stop()
