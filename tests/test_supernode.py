"""`flowerbed supernode start` refuses clearly: wrong CA, wrong host name, unregistered key, bad files."""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flowerbed.certs.ca import CertificateAuthority
from flowerbed.certs.nodekeys import NodeKeyPair
from flowerbed.config import RunSettings
from flowerbed.errors import ExitCode
from flowerbed.probes import free_port
from flowerbed.proc import ManagedProcess, child_env
from flowerbed.runner import check_result, follow, submit
from flowerbed.superlink import control
from flowerbed.supernode.supervisor import Attempt, LogFollower
from tests.conftest import RunningFederation, assert_clean_error, run_cli, wait_for
from tests.connectproxy import connect_proxy
from tests.tlsserver import tls_server


def start_args(superlink: str, ca: Path, key: Path, data: Path, *extra: str) -> list[str]:
    return ["supernode", "start", "--superlink", superlink, "--ca", str(ca), "--key", str(key),
            "--data", str(data), *extra]  # fmt: skip


@pytest.mark.federation
def test_preflight_only_passes(running: RunningFederation, tmp_path: Path) -> None:
    lay = running.layout
    args = start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), running.data.test_file)
    result = run_cli(*args, "--preflight-only", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified against ca.crt" in result.stdout
    assert "clock skew" in result.stdout


@pytest.mark.federation
def test_wrong_ca_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    CertificateAuthority.create("someone else").write(tmp_path / "other.crt", tmp_path / "other.key")
    args = start_args(running.gateway, tmp_path / "other.crt", running.layout.node_key("inst-a"),
                      running.data.test_file)  # fmt: skip
    result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "comes from another flowerbed federation", "other.crt")


@pytest.mark.federation
def test_host_name_not_in_certificate_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(running.layout.ca_cert, running.layout.ca_key)
    ca.issue_server_cert(["link.example.org"]).write(tmp_path / "s.crt", tmp_path / "s.key")
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key") as port:
        args = start_args(f"127.0.0.1:{port}", running.layout.ca_cert,
                          running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
        result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "does not name '127.0.0.1' (it names: link.example.org)")


@pytest.mark.federation
def test_expired_gateway_certificate_is_named(running: RunningFederation, tmp_path: Path) -> None:
    import datetime as dt

    ca = CertificateAuthority.load(running.layout.ca_cert, running.layout.ca_key)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    ca.issue_server_cert(["localhost"], not_before=past, not_after=past + dt.timedelta(days=1)).write(
        tmp_path / "old.crt", tmp_path / "old.key"
    )
    with tls_server(tmp_path / "old.crt", tmp_path / "old.key") as port:
        args = start_args(f"localhost:{port}", running.layout.ca_cert,
                          running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
        result = run_cli(*args, "--preflight-only")
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "the gateway's certificate expired on",
                       "ask the coordinator to run `flowerbed certs renew-server`")  # fmt: skip


@pytest.mark.federation
def test_clock_ahead_of_superlink_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(running.layout.ca_cert, running.layout.ca_key)
    ca.issue_server_cert(["localhost"]).write(tmp_path / "s.crt", tmp_path / "s.key")
    behind = email.utils.formatdate(time.time() - 60, usegmt=True)  # the server's clock is 60 s behind
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key", date_header=behind) as port:
        args = start_args(f"localhost:{port}", running.layout.ca_cert,
                          running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
        result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "s ahead of the gateway (limit 5 s)", "sync the clock")


@pytest.mark.federation
def test_closed_port_is_explained(running: RunningFederation) -> None:
    args = start_args(f"127.0.0.1:{free_port()}", running.layout.ca_cert,
                      running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
    assert_clean_error(
        run_cli(*args),
        ExitCode.PREFLIGHT_FAILED,
        "cannot connect to 127.0.0.1:",
        "ask the coordinator whether it runs",
        "allow outbound TCP",
    )


@pytest.mark.federation
def test_preflight_goes_through_the_sites_proxy(running: RunningFederation, tmp_path: Path) -> None:
    """A proxy-only site: preflight reaches the gateway as the SuperNode will (CONNECT, then TLS)."""
    lay = running.layout
    args = start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), running.data.test_file)
    with connect_proxy() as (proxy_port, seen):
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}", "NO_PROXY": ""}
        result = run_cli(*args, "--preflight-only", "--workdir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reachable via proxy 127.0.0.1:{proxy_port}" in " ".join(result.stdout.split())
    assert running.gateway in seen
    dead = free_port()
    down = run_cli(*args, "--preflight-only", env={"HTTPS_PROXY": f"http://127.0.0.1:{dead}", "NO_PROXY": ""})
    assert_clean_error(down, ExitCode.PREFLIGHT_FAILED, f"the proxy 127.0.0.1:{dead} (HTTPS_PROXY) is unreachable")
    with connect_proxy() as (proxy_port, _):  # it tunnels only to loopback: a far port is refused
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}", "NO_PROXY": ""}
        refused = run_cli(*start_args("localhost:1", lay.ca_cert, lay.node_key("inst-a"), running.data.test_file),
                          "--preflight-only", env=env)  # fmt: skip
    assert_clean_error(refused, ExitCode.PREFLIGHT_FAILED, f"the proxy 127.0.0.1:{proxy_port} refused to open a tunnel")


def test_kit_processes_never_send_loopback_to_the_proxy() -> None:
    env = child_env(extra=None)
    assert {"127.0.0.1", "::1"} <= set(env["NO_PROXY"].split(","))
    os.environ["NO_PROXY"] = "intranet.example.org"
    try:
        merged = child_env()
    finally:
        del os.environ["NO_PROXY"]
    assert merged["NO_PROXY"].split(",")[0] == "intranet.example.org" and "127.0.0.1" in merged["no_proxy"]


@pytest.mark.federation
def test_bad_local_files_are_refused(running: RunningFederation, tmp_path: Path) -> None:
    lay = running.layout
    missing = start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), tmp_path / "nope")
    assert_clean_error(run_cli(*missing), ExitCode.PREFLIGHT_FAILED, "data path", "does not exist")
    no_ca = start_args(running.gateway, tmp_path / "ca.crt", lay.node_key("inst-a"), tmp_path)
    assert_clean_error(run_cli(*no_ca), ExitCode.PREFLIGHT_FAILED, "ca.crt is missing")
    loose = tmp_path / "loose.key"
    NodeKeyPair.generate("x").write(loose, tmp_path / "loose.key.pub")
    loose.chmod(0o644)
    lax = start_args(running.gateway, lay.ca_cert, loose, tmp_path)
    assert_clean_error(run_cli(*lax), ExitCode.PREFLIGHT_FAILED, "other users can read it", "chmod 600")
    bad = start_args("no-port", lay.ca_cert, lay.node_key("inst-a"), tmp_path)
    assert_clean_error(run_cli(*bad), ExitCode.ERROR, "must be HOST:PORT")


@pytest.mark.federation
def test_unregistered_key_stops_with_a_message(running: RunningFederation, tmp_path: Path) -> None:
    key = tmp_path / "stranger.key"
    NodeKeyPair.generate("stranger").write(key, tmp_path / "stranger.key.pub")
    args = start_args(running.gateway, running.layout.ca_cert, key, running.data.test_file,
                      "--workdir", str(tmp_path / "work"), "--port", str(free_port()))  # fmt: skip
    started = time.monotonic()
    result = run_cli(*args, timeout=120)
    assert_clean_error(result, ExitCode.REJECTED, "does not know node key stranger.key (SHA256:", "not registered")
    assert time.monotonic() - started < 60  # at the first refusal, not after the 150 s retry window
    log = (tmp_path / "work" / "logs" / "supernode.log").read_text()
    assert "Failed to activate SuperNode" in log


@pytest.mark.federation
def test_its_own_port_held_by_another_process_stops_with_a_message(running: RunningFederation, tmp_path: Path) -> None:
    """A leftover process on the SuperNode's loopback port: three tries, then one line naming the port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        args = start_args(running.gateway, running.layout.ca_cert, running.layout.node_key("inst-b"),
                          running.data.site_files["inst-b"], "--workdir", str(tmp_path / "work"),
                          "--port", str(port))  # fmt: skip
        result = run_cli(*args, timeout=180)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, f"port {port} on 127.0.0.1 is held by another process",
                       f"ss -ltnp 'sport = :{port}'", "--port")  # fmt: skip
    assert (result.stdout + result.stderr).count("started flower-supernode") == 3


def test_log_is_read_line_by_line_with_timestamps(tmp_path: Path) -> None:
    """A real process's output, invalid UTF-8 included: each line once, timestamped, events noticed."""
    script = (
        "import sys; sys.stdout.buffer.write(b'\\xff\\xfe not utf-8\\n'); sys.stdout.flush(); "
        "print('\\x1b[92mINFO \\x1b[0m:      SuperNode ID: 42', flush=True); "
        "print('flowerbed-task: round 2: received a train task', flush=True); "
        "print('flowerbed-task: round 2: train task FAILED on this site\\'s data: x', flush=True)"
    )
    log = tmp_path / "supernode.log"
    proc = ManagedProcess("fake supernode", [sys.executable, "-c", script], log, pipe=True).start()
    assert proc.popen is not None and proc.popen.stdout is not None
    attempt, seen = Attempt(), []
    follower = LogFollower(proc.popen.stdout, log, attempt, seen.append, "gw:9092").start()
    proc.popen.wait(timeout=30)
    follower.thread.join(timeout=10)
    assert seen == [
        "connected to gw:9092 as node 42",
        "round 2: received a train task",
        "round 2: train task FAILED on this site's data: x",
    ]
    assert attempt.connected and attempt.tasks == 1 and attempt.failed_tasks == 1
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and "\ufffd" in lines[0]
    assert lines[1].endswith(" INFO :      SuperNode ID: 42")  # colour codes are not kept in the log
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines)


def test_a_message_that_no_task_works_on_is_noticed(tmp_path: Path) -> None:
    """Flower's SuperNode waits for each message's reply before the next: the supervisor follows, from the
    SuperNode's and the warm executor's lines, whether a task process works on the message it took."""
    lines = [
        "INFO :      Receiving: train message (ID: 1)",
        "warm executor: task started 7 (pid 100)",
        "INFO :      Received successfully",
        "warm executor: task ended 7 after 1.20 s",
        "INFO :      Sending: train message (ID: 2)",
        "INFO :      Received successfully",  # its task ended before it had the message: no reply will come
    ]
    script = "import sys, time\nfor line in sys.argv[1:]:\n    print(line, flush=True)\n    time.sleep(0.3)\n"
    log = tmp_path / "supernode.log"
    proc = ManagedProcess("supernode lines", [sys.executable, "-c", script, *lines], log, pipe=True).start()
    assert proc.popen is not None and proc.popen.stdout is not None
    attempt = Attempt()
    follower = LogFollower(proc.popen.stdout, log, attempt, lambda _m: None, "gw:9092").start()
    states = []
    for _ in range(100):  # bounded: 6 lines, 0.3 s apart
        states.append((attempt.awaiting_since is not None, attempt.tasks_running))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    follower.thread.join(timeout=10)
    assert (True, 1) in states and (False, 0) in states, states  # working on one; replied
    assert attempt.awaiting_since is not None and attempt.tasks_running == 0
    now = time.monotonic()
    assert 0 < attempt.wedged_for(now) < 5 and attempt.wedged_for(now + 60) >= 60
    attempt.tasks_running = 1  # a task (still) downloading its message over a slow link is not a wedge
    assert attempt.wedged_for(now + 600) == 0


@pytest.mark.federation
def test_site_behind_a_proxy_trains_and_names_the_proxy_when_it_fails(
    running: RunningFederation, tmp_path: Path
) -> None:
    """Only the gateway goes through the proxy (loopback never does); a dead proxy is named, and its return seen."""
    key = tmp_path / "proxy-site.key"
    NodeKeyPair.generate("proxy-site").write(key, tmp_path / "proxy-site.key.pub")
    control.register_node(running.layout.flwr_home, tmp_path / "proxy-site.key.pub", "proxy-site")
    proxy_port = free_port()
    args = start_args(running.gateway, running.layout.ca_cert, key, running.data.site_files["inst-a"],
                      "--workdir", str(tmp_path / "work"), "--port", str(free_port()), "--site", "proxy-site")  # fmt: skip
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    env = {**os.environ, "HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": "", "COLUMNS": "200"}
    lines: list[str] = []
    stack = contextlib.ExitStack()
    _, seen = stack.enter_context(connect_proxy(proxy_port))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "flowerbed"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def saw(text: str, timeout: float) -> bool:
        return wait_for(lambda: any(text in " ".join(line.split()) for line in list(lines)), timeout)

    try:
        assert saw("connected to", 90), "".join(lines)
        settings = RunSettings.model_validate(running.config.run.model_dump() | {"min_nodes": 1, "max_rounds": 1})
        handle = submit(running.layout, settings, name="through-proxy")
        result = follow(running.layout, handle, timeout_s=240)
        check_result(result, handle)
        assert saw("trained on", 10), "".join(lines)
        assert set(seen) == {running.gateway}, seen  # the SuperNode's own loopback calls never went to the proxy
        stack.close()  # the proxy goes down
        assert saw("down since", 90), "".join(lines)
        assert saw(f"the proxy 127.0.0.1:{proxy_port} (HTTPS_PROXY) is unreachable", 5), "".join(lines)
        stack.enter_context(connect_proxy(proxy_port))
        assert saw("is back after", 90), "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stack.close()
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
