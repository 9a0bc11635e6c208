"""`flowerbed supernode start` refuses clearly: wrong CA, wrong host name, unregistered key, bad files."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

from flowerbed.certs.ca import CertificateAuthority
from flowerbed.certs.nodekeys import NodeKeyPair
from flowerbed.errors import ExitCode
from flowerbed.probes import free_port
from tests.conftest import RunningFederation, assert_clean_error, run_cli
from tests.tlsserver import tls_server


def start_args(superlink: str, ca: Path, key: Path, data: Path, *extra: str) -> list[str]:
    return ["supernode", "start", "--superlink", superlink, "--ca", str(ca), "--key", str(key),
            "--data", str(data), *extra]  # fmt: skip


def test_preflight_only_passes(running: RunningFederation, tmp_path: Path) -> None:
    lay = running.layout
    args = start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), running.data.test_file)
    result = run_cli(*args, "--preflight-only", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified against ca.crt" in result.stdout
    assert "clock skew" in result.stdout


def test_wrong_ca_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    CertificateAuthority.create("someone else").write(tmp_path / "other.crt", tmp_path / "other.key")
    args = start_args(running.gateway, tmp_path / "other.crt", running.layout.node_key("inst-a"),
                      running.data.test_file)  # fmt: skip
    result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "is not signed by the federation CA", "other.crt")


def test_host_name_not_in_certificate_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(running.layout.ca_cert, running.layout.ca_key)
    ca.issue_server_cert(["link.example.org"]).write(tmp_path / "s.crt", tmp_path / "s.key")
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key") as port:
        args = start_args(f"127.0.0.1:{port}", running.layout.ca_cert,
                          running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
        result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "does not name '127.0.0.1' (it names: link.example.org)")


def test_clock_ahead_of_superlink_is_refused(running: RunningFederation, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(running.layout.ca_cert, running.layout.ca_key)
    ca.issue_server_cert(["localhost"]).write(tmp_path / "s.crt", tmp_path / "s.key")
    behind = email.utils.formatdate(time.time() - 60, usegmt=True)  # the server's clock is 60 s behind
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key", date_header=behind) as port:
        args = start_args(f"localhost:{port}", running.layout.ca_cert,
                          running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
        result = run_cli(*args)
    assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, "s ahead of the SuperLink", "sync the clock")


def test_closed_port_is_explained(running: RunningFederation) -> None:
    args = start_args(f"127.0.0.1:{free_port()}", running.layout.ca_cert,
                      running.layout.node_key("inst-a"), running.data.test_file)  # fmt: skip
    assert_clean_error(run_cli(*args), ExitCode.PREFLIGHT_FAILED, "cannot connect to 127.0.0.1:", "firewall")


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


def test_unregistered_key_stops_with_a_message(running: RunningFederation, tmp_path: Path) -> None:
    key = tmp_path / "stranger.key"
    NodeKeyPair.generate("stranger").write(key, tmp_path / "stranger.key.pub")
    args = start_args(running.gateway, running.layout.ca_cert, key, running.data.test_file,
                      "--workdir", str(tmp_path / "work"), "--port", str(free_port()),
                      "--rejected-window-s", "4")  # fmt: skip
    started = time.monotonic()
    result = run_cli(*args, timeout=120)
    assert_clean_error(result, ExitCode.REJECTED, "refused node key stranger.key", "not registered")
    assert time.monotonic() - started < 100
    log = (tmp_path / "work" / "logs" / "supernode.log").read_text()
    assert "Failed to activate SuperNode" in log
