"""The firewall checklist (stdlib only) against local servers: every row and the exit code."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerbed.certs.ca import CertificateAuthority
from flowerbed.deploy import firewall_checklist
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port
from tests.conftest import make_config, make_federation, run_cli
from tests.connectproxy import connect_proxy
from tests.tlsserver import tls_server

SCRIPT = Path(__file__).parent.parent / "deploy" / "firewall_checklist.py"


def checklist(
    *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the script with the interpreter in isolated mode (no site-packages: stdlib only)."""
    base = dict(os.environ)
    for key in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        base.pop(key, None)
    return subprocess.run(
        [*(prefix or []), sys.executable, "-I", "-S", str(SCRIPT), "--install-path", "offline", *args],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})}, check=False,
    )  # fmt: skip


def rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    data = json.loads(result.stdout)
    return {r["check"]: r for r in data["rows"]}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    return make_federation(tmp_path_factory.mktemp("fw") / "fed", make_config("fw"))


def test_runs_on_python_38_syntax_and_stdlib_only() -> None:
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 8))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


@pytest.mark.federation
def test_all_pass_against_the_kit_certificate(fed: FederationLayout) -> None:
    with tls_server(fed.server_cert, fed.server_key) as port:
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.ca_cert),
                           "--extra-domain", f"localhost:{port}", "--json")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    by = rows(result)
    assert by["dns localhost"]["status"] == "PASS"
    assert by[f"tcp localhost:{port}"]["status"] == "PASS"
    tls = by[f"tls gateway localhost:{port}"]
    assert tls["status"] == "PASS"
    assert "verified against ca.crt; names: localhost, 127.0.0.1" in str(tls["detail"])
    assert "days left" in str(tls["detail"])
    assert by["clock skew"]["status"] == "PASS"
    # measured, not assumed: the row agrees with this machine's listeners
    listeners = firewall_checklist.listening_ports()
    assert by["inbound"]["status"] == ("PASS" if not listeners else "INFO")
    assert all(port in str(by["inbound"]["detail"]) for port in listeners or [])
    assert by["proxy"]["detail"] == "no HTTPS_PROXY set: direct connections"


def test_inbound_row_is_measured(tmp_path: Path, fed: FederationLayout) -> None:
    """listening_ports() reads real /proc/net files: loopback listeners are not exposure."""
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(
        header
        + "   0: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n"  # 127.0.0.1:9092
        + "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2 1\n"  # 0.0.0.0:22
        + "   2: 0500000A:1F90 0600000A:C350 01 00000000:00000000 00:00000000 00000000 0 0 3 1\n"  # established
    )
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000001000000:2386 00000000000000000000000000000000:0000 0A 0 0 0 0 0 4 1\n"
    )
    assert firewall_checklist.listening_ports(tmp_path) == ["22"]
    (tmp_path / "tcp").write_text(header)
    assert firewall_checklist.listening_ports(tmp_path) == []
    assert firewall_checklist.listening_ports(tmp_path / "missing") is None
    # inside a namespace with nothing but loopback, the real row says PASS
    if shutil.which("ip") is not None and os.geteuid() == 0:
        name = f"fb-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            result = checklist("--json", prefix=["ip", "netns", "exec", name])
            assert rows(result)["inbound"]["status"] == "PASS"
        finally:
            subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.federation
def test_server_certificate_given_as_ca_is_named(fed: FederationLayout) -> None:
    """A wrong --ca file is not interception: the message sends the admin to the right file, not another team."""
    with tls_server(fed.server_cert, fed.server_key) as port:
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.server_cert), "--json")
    tls = rows(result)[f"tls gateway localhost:{port}"]
    assert tls["status"] == "FAIL" and "interception" not in str(tls["detail"])
    assert f"{fed.server_cert} is not a CA certificate: it is a server certificate" in str(tls["detail"])
    assert "ca.crt from the site kit (not server.crt)" in str(tls["fix"])


@pytest.mark.federation
def test_another_federations_ca_is_named(fed: FederationLayout, tmp_path: Path) -> None:
    CertificateAuthority.create("other federation CA").write(tmp_path / "other.crt", tmp_path / "other.key")
    with tls_server(fed.server_cert, fed.server_key) as port:
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(tmp_path / "other.crt"), "--json")
    tls = rows(result)[f"tls gateway localhost:{port}"]
    assert "comes from another flowerbed federation" in str(tls["detail"]) and "interception" not in str(tls["detail"])


@pytest.mark.federation
def test_foreign_certificate_is_reported_as_interception(fed: FederationLayout, tmp_path: Path) -> None:
    other = CertificateAuthority.create("corporate proxy CA", organization="Example Corp")
    other.issue_server_cert(["localhost"]).write(tmp_path / "mitm.crt", tmp_path / "mitm.key")
    with tls_server(tmp_path / "mitm.crt", tmp_path / "mitm.key") as port:
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.ca_cert), "--json")
    assert result.returncode == 1
    tls = rows(result)[f"tls gateway localhost:{port}"]
    assert tls["status"] == "FAIL"
    assert "TLS interception" in str(tls["detail"]) and "corporate proxy CA" in str(tls["detail"])
    assert "exempt" in str(tls["fix"])


def test_closed_port_fails_with_a_fix(fed: FederationLayout) -> None:
    port = free_port()
    result = checklist("--superlink", f"127.0.0.1:{port}", "--ca", str(fed.ca_cert))
    assert result.returncode == 1
    assert f"tcp gateway 127.0.0.1:{port}  FAIL" in result.stdout
    assert f"fix: allow outbound TCP {port} to 127.0.0.1" in result.stdout
    assert "result: 1 required check(s) failed" in result.stdout


@pytest.mark.federation
def test_unverified_when_no_ca_is_given(fed: FederationLayout) -> None:
    with tls_server(fed.server_cert, fed.server_key) as port:
        result = checklist("--superlink", f"localhost:{port}", "--json")
    assert result.returncode == 0  # a warning, not a failure
    tls = rows(result)[f"tls gateway localhost:{port}"]
    assert tls["status"] == "WARN" and "not verified" in str(tls["detail"]) and "fw federation CA" in str(tls["detail"])


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with only a loopback interface: no DNS server is reachable."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs iproute2 and root")
    name = f"fb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_name_that_does_not_resolve(netns: str) -> None:
    result = checklist(
        "--superlink", "link.flowerbed-test.invalid:9092", "--json", prefix=["ip", "netns", "exec", netns]
    )
    assert result.returncode == 1, result.stderr
    dns = rows(result)["dns link.flowerbed-test.invalid"]
    assert dns["status"] == "FAIL" and "does not resolve" in str(dns["detail"])


@pytest.mark.federation
def test_through_a_connect_proxy(fed: FederationLayout) -> None:
    with tls_server(fed.server_cert, fed.server_key) as port, connect_proxy() as (proxy_port, seen):
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}"}
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.ca_cert), "--json", env=env)
        assert result.returncode == 0, result.stdout
        by = rows(result)
        assert by[f"tcp gateway localhost:{port}"]["detail"] == f"reachable via proxy 127.0.0.1:{proxy_port}"
        assert "through the proxy" in str(by["proxy"]["detail"])
        assert f"localhost:{port}" in seen
        bypass = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.ca_cert), "--json",
                           env={**env, "NO_PROXY": "localhost"})  # fmt: skip
        assert "directly (NO_PROXY)" in str(rows(bypass)["proxy"]["detail"])


@pytest.mark.federation
def test_proxy_that_refuses_is_reported(fed: FederationLayout) -> None:
    with connect_proxy() as (proxy_port, _):
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}"}
        result = checklist("--superlink", "localhost:1", "--json", env=env)
    assert result.returncode == 1
    row = rows(result)["proxy tunnel to gateway localhost:1"]
    assert f"the proxy 127.0.0.1:{proxy_port} refused to open a tunnel to localhost:1" in str(row["detail"])
    assert "502" in str(row["detail"]) and "allow CONNECT to localhost:1" in str(row["fix"])


def test_proxy_that_is_down_is_reported() -> None:
    dead = free_port()
    result = checklist("--superlink", "localhost:9092", "--json", env={"HTTPS_PROXY": f"http://127.0.0.1:{dead}"})
    assert result.returncode == 1
    row = rows(result)[f"proxy 127.0.0.1:{dead}"]
    assert row["status"] == "FAIL"
    assert f"the proxy 127.0.0.1:{dead} (HTTPS_PROXY) is unreachable" in str(row["detail"])


def test_allowlist_for_the_it_ticket() -> None:
    result = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), "--superlink", "localhost:9092", "--os-packages", "ubuntu", "--allowlist"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[2] == "localhost (127.0.0.1)\t9092\tflowerbed SuperLink gateway (TLS, Flower Fleet API)"
    hosts = [line.split("\t")[0] for line in lines[3:]]
    assert hosts == ["repo.anaconda.com", "conda.anaconda.org", "docs.conda.io", "pypi.org",
                     "files.pythonhosted.org", "download.pytorch.org", "azure.archive.ubuntu.com",
                     "security.ubuntu.com", "packages.microsoft.com"]  # fmt: skip
    offline = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), "--install-path", "offline", "--allowlist", "--superlink", "localhost"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert len(offline.stdout.splitlines()) == 3  # only the gateway


def test_cli_wrapper_passes_arguments_and_exit_code() -> None:
    ok = run_cli("check", "firewall", "--install-path", "offline", "--allowlist", "--superlink", "localhost")
    assert ok.returncode == 0 and "localhost (127.0.0.1)\t9092" in ok.stdout
    bad = run_cli("check", "firewall", "--install-path", "offline", "--superlink", f"127.0.0.1:{free_port()}")
    assert bad.returncode == 1 and "FAIL" in bad.stdout


@pytest.mark.federation
def test_in_a_site_kit_it_checks_what_that_kit_needs(fed: FederationLayout, tmp_path: Path) -> None:
    """`python3 firewall_checklist.py` in an unpacked kit: gateway, CA and install path come from the kit.

    A kit that carries `wheels/` installs offline, so only the gateway is needed (no package
    destination is checked); without `wheels/` the conda destinations are listed.
    """
    built = run_cli("kit", "build", "-d", str(fed.root), "--site", "inst-a", timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    kit = tmp_path / "inst-a"
    shutil.copytree(fed.root / "kits" / "inst-a", kit)
    base = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "no_proxy")}
    with tls_server(fed.server_cert, fed.server_key) as port:
        site = kit / "site.toml"
        site.write_text(site.read_text().replace(f"superlink_port = {fed_port(site)}", f"superlink_port = {port}"))
        (kit / "wheels").mkdir()
        shutil.copy(next(kit.glob("flowerbed-*.whl")), kit / "wheels")  # an offline kit holds its wheels here
        offline = subprocess.run([sys.executable, "-I", "-S", "firewall_checklist.py", "--json"], cwd=kit,
                                 capture_output=True, text=True, timeout=60, env=base, check=False)  # fmt: skip
        shutil.rmtree(kit / "wheels")
        online = subprocess.run([sys.executable, "-I", "-S", "firewall_checklist.py", "--allowlist"],
                                cwd=kit, capture_output=True, text=True, timeout=60, env=base, check=False)  # fmt: skip
    assert offline.returncode == 0, offline.stdout + offline.stderr
    by = rows(offline)
    assert by["kit"]["detail"] == (f"from the site kit {kit}: gateway localhost:{port}, ca.crt, install path offline "
                                   "(the kit carries wheels/)")  # fmt: skip
    assert by[f"tls gateway localhost:{port}"]["status"] == "PASS"
    assert "verified against ca.crt" in str(by[f"tls gateway localhost:{port}"]["detail"])
    assert not any(name.startswith(("dns pypi", "tcp pypi", "dns repo")) for name in by)
    assert online.returncode == 0, online.stderr  # no wheels/: the conda install path's destinations too
    assert "repo.anaconda.com" in online.stdout and "localhost" in online.stdout


def fed_port(site_toml: Path) -> str:
    return next(line.split("=")[1].strip() for line in site_toml.read_text().splitlines()
                if line.startswith("superlink_port"))  # fmt: skip


@pytest.mark.federation
def test_a_clock_days_behind_is_named_as_a_clock_problem(fed: FederationLayout) -> None:
    """A site clock 2 days behind sees the kit's certificates as not yet valid: said so, with the offset."""
    from tests.test_clock import faketime_library

    env = {"LD_PRELOAD": faketime_library(), "FAKETIME": "-2d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    with tls_server(fed.server_cert, fed.server_key) as port:
        result = checklist("--superlink", f"localhost:{port}", "--ca", str(fed.ca_cert), "--json", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    row = rows(result)[f"tls gateway localhost:{port}"]
    assert row["status"] == "FAIL"
    assert str(row["detail"]).startswith("this VM's clock is 2.0 days behind the gateway's"), row
    assert "signed by another key" not in str(row["detail"]) and "set this VM's clock (NTP)" in str(row["fix"])


def test_one_host_port_parser_serves_the_checklist_and_the_preflight() -> None:
    from flowerbed.deploy.firewall_checklist import parse_host_port
    from flowerbed.errors import FlowerbedError
    from flowerbed.supernode.preflight import parse_address

    assert parse_host_port("link.example.org:9092") == ("link.example.org", 9092)
    assert parse_host_port("link.example.org", 9092) == ("link.example.org", 9092)
    assert parse_host_port("[fd00::1]:8443") == ("fd00::1", 8443)
    assert parse_host_port("[fd00::1]", 443) == ("fd00::1", 443)
    assert parse_host_port("fd00::1", 443) == ("fd00::1", 443)  # no brackets: the whole is the host
    for bad, why in (("link:port", "not a number from 1 to 65535"), ("link:70000", "not a number"),
                     (":9092", "has no host"), ("link.example.org", "has no port")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_host_port(bad)
    assert parse_address("[fd00::1]:9092") == ("fd00::1", 9092)
    with pytest.raises(FlowerbedError, match="must be HOST:PORT"):
        parse_address("link.example.org")
