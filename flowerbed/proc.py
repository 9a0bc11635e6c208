"""Child processes started with a readiness deadline and stopped by pid (gracefully first)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowerbed.errors import FlowerbedError

POLL_S = 0.25
# The addresses the kit's processes use among themselves (Flower's Runtime APIs bind 127.0.0.1).
LOOPBACK = ("127.0.0.1", "::1")


def bin_dir() -> Path:
    """The folder of this environment's console scripts (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


def child_env(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every process the kit starts.

    Telemetry and update checks are off; this environment's bin folder comes first on PATH
    because flower-superlink spawns ``flower-superexec`` by name.
    """
    env = dict(os.environ)
    # Plain output, whatever the caller's terminal forces (a Jupyter kernel sets FORCE_COLOR and
    # CLICOLOR_FORCE): `flwr ... --format json` would otherwise print JSON wrapped in colour codes.
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE", "CLICOLOR"):
        env.pop(name, None)
    env["NO_COLOR"] = "1"
    if env.get("MPLBACKEND", "").startswith("module://"):  # a notebook's inline backend
        env.pop("MPLBACKEND")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    # Behind a proxy, loopback must never go to it: the SuperNode calls its own Runtime API on
    # 127.0.0.1, and an off-host proxy cannot reach that (tasks would never run).
    for name in ("NO_PROXY", "no_proxy"):
        entries = [e.strip() for e in env.get(name, "").split(",") if e.strip()]
        env[name] = ",".join(entries + [h for h in LOOPBACK if h not in entries])
    if flwr_home is not None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def executable(name: str, hint: str) -> str:
    """Absolute path of ``name``, looked up in this environment first, or a clear error."""
    found = shutil.which(name, path=os.pathsep.join([str(bin_dir()), os.environ.get("PATH", "")]))
    if not found:
        raise FlowerbedError(f"`{name}` was not found: {hint}")
    return found


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _terminate_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the parent dies (even by SIGKILL)."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def pdeathsig_argv(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` prefixed with util-linux ``setpriv --pdeathsig TERM`` when it is installed, else as is.

    Returns the argv and whether a Python ``preexec_fn`` must set the signal instead. setpriv is
    preferred: a ``preexec_fn`` makes Python fork (not vfork) and run the at-fork handlers of the
    libraries loaded in the parent in the child before exec; gRPC's restarted its poller there and
    aborted the child (SIGABRT, "epoll_wait error: Bad file descriptor") once in a while.
    """
    tool = shutil.which("setpriv")
    if tool is None:
        return argv, True
    return [tool, "--pdeathsig", "TERM", "--", *argv], False


@dataclass
class ManagedProcess:
    """One child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=child_env)
    cwd: Path | None = None
    pipe: bool = False  # True: output goes to ``popen.stdout`` for the caller to read (and log)
    die_with_parent: bool = False  # Linux: SIGTERM when the starting thread dies (a killed supervisor orphans none)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id, or an error when it was never started."""
        if self.popen is None:
            raise FlowerbedError(f"{self.name} was never started")
        return self.popen.pid

    def start(self) -> ManagedProcess:
        """Start the process in its own session, output appended to ``log_path`` (or piped)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, object] = {}
        argv = self.argv
        if os.name == "posix":
            kwargs["start_new_session"] = True
            if self.die_with_parent and sys.platform == "linux":
                argv, in_python = pdeathsig_argv(argv)
                if in_python:
                    kwargs["preexec_fn"] = _terminate_with_parent
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if self.pipe else log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                **kwargs,  # type: ignore[call-overload]
            )
        return self

    def poll(self) -> int | None:
        """Exit status, or None while running."""
        return None if self.popen is None else self.popen.poll()

    def wait_ready(self, probe: Callable[[], bool], deadline_s: float) -> None:
        """Poll ``probe`` until it is true; fail if the process exits or the deadline passes."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            code = self.poll()
            if code is not None:
                raise FlowerbedError(
                    f"{self.name} exited with status {code} while starting; see {self.log_path}: {tail(self.log_path)}"
                )
            if probe():
                return
            time.sleep(POLL_S)
        raise FlowerbedError(f"{self.name} did not become ready within {deadline_s:.0f} s; see {self.log_path}")

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after ``grace_s``; returns the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is not None:
            # The leader is gone, but its children (an nginx worker, a clientapp) may live on in
            # its process group and hold ports: end them too.
            self._signal(signal.SIGKILL if os.name == "posix" else signal.SIGTERM)
            return self.popen.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL if os.name == "posix" else signal.SIGTERM)
            return self.popen.wait(timeout=grace_s)

    def _signal(self, sig: signal.Signals) -> None:
        if self.popen is None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.popen.pid, sig)
            else:  # pragma: no cover - Windows
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass


def kill_group(pgid: int) -> None:
    """End a process group that outlived its leader (SIGTERM, then SIGKILL a moment later)."""
    if os.name != "posix":  # pragma: no cover - Windows has no process groups of this kind
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


def stop_all(processes: list[ManagedProcess], grace_s: float = 10.0) -> None:
    """Stop processes together: SIGTERM to each (the last started first), then wait for all within one
    ``grace_s``, SIGKILL for what is left. One after the other, their graceful shutdowns added up."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc._signal(signal.SIGTERM)
    end = time.monotonic() + grace_s
    for proc in reversed(processes):
        proc.stop(max(end - time.monotonic(), 0.5))
