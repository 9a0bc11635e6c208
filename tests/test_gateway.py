"""The Fleet gateway (real nginx) lets only /v1/fleet/ through; the loopback SuperLink serves everything."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

import pytest

from flowerbed.errors import FlowerbedError
from flowerbed.superlink import control, flwrcli, gateway
from tests.conftest import RunningFederation, wait_for

BLOCKED = [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/runtime/acquire-task"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/health"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
]


def request(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/protobuf"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Server") or ""
    finally:
        conn.close()


RUNTIME_UNAUTHENTICATED = 401


@pytest.mark.federation
@pytest.mark.parametrize(("method", "path"), BLOCKED)
def test_gateway_blocks_everything_but_fleet(running: RunningFederation, method: str, path: str) -> None:
    status, server = request(running.config.superlink.port, running.layout.ca_cert, method, path)
    assert status in (403, 404), (path, status)
    assert server == "nginx"


@pytest.mark.federation
@pytest.mark.parametrize(("method", "path"), BLOCKED[:2])
def test_loopback_superlink_serves_control_api(running: RunningFederation, method: str, path: str) -> None:
    status, server = request(running.config.superlink.internal_port, running.layout.ca_cert, method, path)
    assert status == 200
    assert server == "uvicorn"


@pytest.mark.federation
def test_runtime_api_exists_on_loopback_only(running: RunningFederation) -> None:
    """The Runtime API answers on loopback (and refuses a caller without the executor's secret); the gateway 404s it."""
    status, server = request(running.config.superlink.internal_port, running.layout.ca_cert, *BLOCKED[2])
    assert (status, server) == (RUNTIME_UNAUTHENTICATED, "uvicorn")
    status, server = request(running.config.superlink.port, running.layout.ca_cert, *BLOCKED[2])
    assert (status, server) == (404, "nginx")


@pytest.mark.federation
def test_gateway_logs_are_where_the_docs_say(running: RunningFederation) -> None:
    request(running.config.superlink.port, running.layout.ca_cert, "GET", "/nothing-here")
    access = running.layout.logs / "gateway-access.log"
    # nginx logs a request when it finalizes it, which can be just after the client has the answer
    assert wait_for(lambda: access.is_file() and "/nothing-here" in access.read_text(), 10)
    assert (running.layout.logs / "gateway-error.log").is_file()
    assert "superlink/logs/" in (Path(__file__).parent.parent / "docs" / "quickstart-coordinator.md").read_text()


@pytest.mark.federation
def test_fleet_api_passes_but_needs_node_auth(running: RunningFederation) -> None:
    port = running.config.superlink.port
    status, server = request(port, running.layout.ca_cert, "POST", "/v1/fleet/pull-messages")
    assert (status, server) == (401, "nginx")  # Flower's answer, relayed: unsigned request
    assert request(port, running.layout.ca_cert, "GET", "/v1/fleet/pull-messages")[0] == 403


@pytest.mark.federation
def test_gateway_accepts_large_bodies(running: RunningFederation) -> None:
    # Flower pushes 5 MiB array chunks; nginx's default 1 MiB limit would answer 413 (never retried).
    body = b"\0" * (5 * 1024 * 1024 + 4096)
    port, ca = running.config.superlink.port, running.layout.ca_cert
    status, _ = request(port, ca, "POST", "/v1/fleet/push-object", body)
    assert status in (400, 401)  # Flower rejects the junk body; nginx let it through
    huge = b"\0" * (17 * 1024 * 1024)
    assert request(port, ca, "POST", "/v1/fleet/push-object", huge)[0] == 413


@pytest.mark.federation
def test_every_site_key_is_registered(running: RunningFederation) -> None:
    assert running.stack.registered == ["inst-a", "inst-b", "univ-hospital"]
    # At least the three: this coordinator is shared, and a site another test restarted signed off its
    # session and came back as a new node (the suite's order differs between workers).
    assert len(flwrcli.list_nodes(running.layout.flwr_home)) >= 3
    # registering again is not an error (state survives restarts)
    assert control.register_node(running.layout.flwr_home, running.layout.node_pub("inst-a"), "inst-a") is None


@pytest.mark.federation
def test_superlink_binds_loopback_only(running: RunningFederation) -> None:
    text = Path("/proc/net/tcp").read_text()
    port_hex = f"{running.config.superlink.internal_port:04X}"
    listeners = [line.split()[1] for line in text.splitlines()[1:] if line.split()[3] == "0A"]
    bound = [addr for addr in listeners if addr.endswith(":" + port_hex)]
    assert bound == ["0100007F:" + port_hex]  # 127.0.0.1 only


@pytest.mark.federation
def test_rendered_config_passes_nginx_t(tmp_path: Path, running: RunningFederation) -> None:
    nginx = gateway.find_nginx()
    gateway.render_config(
        tmp_path, listen_host="127.0.0.1", listen_port=1, upstream_port=2,
        cert=running.layout.server_cert, key=running.layout.server_key, ca=running.layout.ca_cert,
        logs=tmp_path / "logs",
    )  # fmt: skip
    gateway.validate(nginx, tmp_path)
    conf = (tmp_path / "nginx.conf").read_text()
    assert "client_max_body_size 16m;" in conf
    assert "location /v1/fleet/" in conf
    (tmp_path / "nginx.conf").write_text(conf.replace("worker_connections 4096;", "worker_connections;"))
    with pytest.raises(FlowerbedError, match="is invalid"):
        gateway.validate(nginx, tmp_path)


@pytest.mark.federation
def test_gateway_closes_idle_connections_cleanly(running: RunningFederation) -> None:
    """An idle keep-alive connection gets a clean close (EOF) after idle_timeout_s, not a silent drop."""
    import socket
    import time

    ctx = ssl.create_default_context(cafile=str(running.layout.ca_cert))
    port = running.config.superlink.port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = tls.recv(4096)
        assert first.startswith(b"HTTP/1.1 404")
        started = time.monotonic()
        tls.settimeout(30)
        assert tls.recv(4096) == b""  # EOF: nginx closed the idle connection
        waited = time.monotonic() - started
    assert running.config.superlink.idle_timeout_s - 0.5 <= waited < 20
