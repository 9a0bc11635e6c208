"""`flowerbed superlink start` as a coordinator runs it: up with every child ready, down on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowerbed.probes import tcp_open
from tests.conftest import make_config, make_federation, wait_for
from tests.faults import record
from tests.procs import alive as pid_alive


@pytest.mark.federation
def test_start_then_sigterm_stops_every_child(tmp_path: Path) -> None:
    config = make_config("cli")
    layout = make_federation(tmp_path / "fed", config)
    sl = config.superlink
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_for(layout.pidfile.exists, 120), "supervisor.json never appeared"
        pids = json.loads(layout.pidfile.read_text())["processes"]
        assert set(pids) == {"flower-superlink", "ServerApp executor", "gateway (nginx)"}
        assert all(pid_alive(p) for p in pids.values())
        assert tcp_open("127.0.0.1", sl.port) and tcp_open("127.0.0.1", sl.internal_port)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, output
    flat = " ".join(output.split())
    assert "registered node key of site inst-a" in flat
    assert f"logs: {layout.logs}" in flat
    assert "stopped SuperLink, executor and gateway" in flat
    assert wait_for(lambda: not any(pid_alive(p) for p in pids.values()), 20)
    assert not tcp_open("127.0.0.1", sl.port)
    assert not tcp_open("127.0.0.1", sl.internal_port)
    assert not layout.pidfile.exists()
    assert layout.database.is_file()  # state survives for the next start


@pytest.mark.federation
def test_second_start_on_same_ports_is_refused(tmp_path: Path) -> None:
    config = make_config("busy")
    layout = make_federation(tmp_path / "fed", config)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", config.superlink.internal_port))
        sock.listen(1)
        result = subprocess.run(
            [sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {config.superlink.internal_port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.federation
def test_gateway_port_held_by_another_process_is_refused(tmp_path: Path) -> None:
    """A TCP probe would be answered by the other process: refuse before start, never claim "up"."""
    import socket

    config = make_config("held")
    layout = make_federation(tmp_path / "fed", config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", config.superlink.port))
        sock.listen(1)
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flowerbed"), "superlink", "start"],
            capture_output=True, text=True, timeout=120, check=False, cwd=layout.root,  # the default -d .
        )  # fmt: skip
    flat = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stderr
    assert f"port {config.superlink.port} on 127.0.0.1 is already in use by another process" in flat
    assert "is up" not in result.stdout and "Traceback" not in flat
    assert not layout.pidfile.exists()


@pytest.mark.federation
def test_nginx_location_override_is_checked(tmp_path: Path) -> None:
    config = make_config("nginx")
    layout = make_federation(tmp_path / "fed", config)
    result = subprocess.run(
        [sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "FLOWERBED_NGINX": str(tmp_path / "no-nginx")},
    )  # fmt: skip
    assert result.returncode == 1
    assert f"FLOWERBED_NGINX is {tmp_path / 'no-nginx'}, which does not exist" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not layout.pidfile.exists()


@pytest.mark.federation
def test_refused_node_keys_are_named_at_both_ends(tmp_path: Path) -> None:
    """A key the SuperLink does not know: the site says "not registered" at once, the coordinator names it."""
    from flowerbed.certs.nodekeys import NodeKeyPair, load_public_key, public_fingerprint
    from flowerbed.demodata import make_demo_data
    from flowerbed.probes import free_port
    from tests.conftest import SITES, run_cli

    config = make_config("refused")
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    key = tmp_path / "stranger.key"
    NodeKeyPair.generate("stranger").write(key, tmp_path / "stranger.key.pub")
    fingerprint = public_fingerprint(load_public_key(tmp_path / "stranger.key.pub"))
    proc = subprocess.Popen([sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert wait_for(layout.pidfile.exists, 120), "the coordinator did not start"
        started = time.monotonic()
        site = run_cli("supernode", "start", "--superlink", f"localhost:{config.superlink.port}", "--ca",
                       str(layout.ca_cert), "--key", str(key), "--data", str(data.site_files["inst-a"]), "--workdir",
                       str(tmp_path / "work"), "--port", str(free_port()), timeout=200)  # fmt: skip
        took = time.monotonic() - started
        time.sleep(3)  # the coordinator reads its SuperLink's log each second
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    text = " ".join((site.stdout + site.stderr).split())
    assert site.returncode == 4 and "Traceback" not in text, text  # ExitCode.REJECTED
    assert f"the SuperLink does not know node key stranger.key ({fingerprint}): it is not registered" in text, text
    assert "previous session" not in text and took < 60, (took, text)  # at once, not after 150 s of retries
    flat = " ".join(output.split())
    assert f"the SuperLink refused node key {fingerprint} (a key this federation does not know)" in flat, flat
    assert flat.count(fingerprint) == 1  # once, not for every retry
    record("a node key the SuperLink does not know", "site: 'not registered' at the first refusal; coordinator: "
           "the key's fingerprint", injected="a SuperNode started with an unregistered key", noticed_s=took)  # fmt: skip


@pytest.mark.federation
def test_a_killed_coordinator_leaves_no_child_behind(tmp_path: Path) -> None:
    """SIGKILL to `flowerbed superlink start`: SuperLink, executor and gateway end with it, the ports are free."""
    config = make_config("orphans")
    layout = make_federation(tmp_path / "fed", config)
    proc = subprocess.Popen([sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    pids: dict[str, int] = {}
    try:
        assert wait_for(layout.pidfile.exists, 120), "the coordinator did not start"
        pids = json.loads(layout.pidfile.read_text())["processes"]
        proc.kill()
        proc.wait(timeout=30)
        assert wait_for(lambda: not any(pid_alive(p) for p in pids.values()), 30), pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in pids.values():  # never left behind, even when the test fails
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    sl = config.superlink
    assert wait_for(lambda: not tcp_open("127.0.0.1", sl.internal_port) and not tcp_open("127.0.0.1", sl.port), 20)
    record("the coordinator's supervisor killed (SIGKILL)", "SuperLink, executor and gateway ended with it; the ports "
           "were free", injected="kill -9 of `flowerbed superlink start`")  # fmt: skip
