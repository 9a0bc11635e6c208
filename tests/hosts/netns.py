"""A small network of hosts made of Linux network namespaces, for tests that need separate hosts.

Each host is a namespace with one veth link to a bridge in a "lan" namespace, its own address in
a private test subnet that exists only inside these namespaces, its own ``/etc/hosts`` (``ip netns
exec`` bind-mounts ``/etc/netns/NAME/hosts``), its own HOME, and nftables rules. Nothing here
routes to the machine's real network. Everything is removed on exit, also when a test fails; every
process started through a host is stopped by its process group.

Reused by the fault tests (a site away for minutes, a coordinator restart): ``Host.cut()`` and
``Host.restore()`` drop and restore a host's link.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import descendants

NETNS_ETC = Path("/etc/netns")


def available() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"needs {tool} (apt-get install iproute2 nftables)"
    return None


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``check``, a failure raises with its stderr in the message."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class Background:
    """A process started on a host; its output is collected in ``lines``."""

    name: str
    popen: subprocess.Popen[str]
    log: Path
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def saw(self, needle: str, timeout: float) -> bool:
        """True once ``needle`` appears in the output (whitespace-normalised), within ``timeout``."""
        from tests.conftest import wait_for

        wait_for(lambda: needle in " ".join(self.text().split()) or self.popen.poll() is not None, timeout)
        return needle in " ".join(self.text().split())

    def power_off(self) -> None:
        """SIGKILL the process and everything it started, at once (a VM that loses power)."""
        for pid in descendants(self.popen.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, grace_s: float = 30) -> int | None:
        """SIGTERM the process group, then SIGKILL."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with suppress(ProcessLookupError):  # children that outlived their leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


@dataclass
class Host:
    """One namespace = one machine."""

    name: str
    netns: str
    address: str
    home: Path
    env: dict[str, str]
    procs: list[Background] = field(default_factory=list)

    def _argv(self, command: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "bash", "-euo", "pipefail", "-c", command]

    def run(self, command: str, *, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a bash command on this host (its HOME, PATH and proxy settings)."""
        return subprocess.run(
            self._argv(command), capture_output=True, text=True, timeout=timeout, check=False,
            cwd=cwd or self.home, env={**self.env, **(env or {})},
        )  # fmt: skip

    def start(self, name: str, command: str, *, cwd: Path | None = None) -> Background:
        """Start a long-running bash command on this host, output to HOME/NAME.out."""
        log = self.home / f"{name}.out"
        with log.open("w") as out:
            popen = subprocess.Popen(
                self._argv(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                cwd=cwd or self.home, env=self.env, start_new_session=True,
            )  # fmt: skip
        proc = Background(name, popen, log)
        self.procs.append(proc)
        return proc

    def firewall(self, rules: str) -> None:
        """Replace this host's nftables ruleset (``rules`` is an nft script body)."""
        script = self.home.parent / f"{self.name}.nft"
        script.write_text("flush ruleset\n" + rules)
        sh("ip", "netns", "exec", self.netns, "nft", "-f", str(script))

    def listeners(self) -> list[str]:
        """Local addresses of listening TCP sockets (``ss -Hltn``)."""
        out = sh("ip", "netns", "exec", self.netns, "ss", "-Hltn").stdout
        return [line.split()[3] for line in out.splitlines() if line.strip()]

    def cut(self) -> None:
        """Take the host's link down (for fault tests)."""
        sh("ip", "-n", self.netns, "link", "set", "eth0", "down")

    def restore(self) -> None:
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")


class Network:
    """Hosts on one bridge; ``names`` maps DNS names to host names for every host's /etc/hosts."""

    def __init__(self, root: Path, subnet_index: int = 0) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:6]
        self.lan = f"fb{self.tag}-lan"
        self.prefix = f"10.250.{subnet_index}"
        self.hosts: dict[str, Host] = {}
        self.names: dict[str, str] = {}
        self.own: dict[str, dict[str, str]] = {}  # per host: names only it resolves differently
        self._netns: list[str] = [self.lan]
        sh("ip", "netns", "add", self.lan)
        sh("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.lan, "link", "set", "br0", "up")

    def add(self, name: str, env: dict[str, str] | None = None) -> Host:
        index = len(self.hosts) + 1
        netns = f"fb{self.tag}-h{index}"  # short: interface and namespace names have length limits
        sh("ip", "netns", "add", netns)
        self._netns.append(netns)
        outer = f"v{self.tag}{index}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", outer, "netns", self.lan)
        sh("ip", "-n", self.lan, "link", "set", outer, "master", "br0")
        sh("ip", "-n", self.lan, "link", "set", outer, "up")
        address = f"{self.prefix}.{index}"
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        base |= {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
                 "COLUMNS": "200", "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        host = Host(name, netns, address, home, base | (env or {}))
        self.hosts[name] = host
        return host

    def name(self, dns: str, host: Host, *, on: Host | None = None, address: str | None = None) -> None:
        """Let every host (or only ``on``) resolve ``dns`` to ``host``'s address (or ``address``)."""
        if on is None:
            self.names[dns] = address or host.address
        else:
            self.own.setdefault(on.name, {})[dns] = address or host.address
        for h in self.hosts.values():
            names = self.names | self.own.get(h.name, {})
            text = "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items())
            folder = NETNS_ETC / h.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(text)

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in reversed(host.procs):
                proc.stop()
        for netns in reversed(self._netns):
            sh("ip", "netns", "delete", netns, check=False)
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


@contextmanager
def network(root: Path, subnet_index: int = 0) -> Iterator[Network]:
    """A network that is always torn down (namespaces, /etc/netns files, processes)."""
    net = Network(root, subnet_index)
    try:
        yield net
    finally:
        net.close()
