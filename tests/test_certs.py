"""The federation PKI: real TLS handshakes, key modes, a CA that is never silently replaced."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from flowerbed.certs import service
from flowerbed.certs.ca import CertificateAuthority
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from tests.conftest import make_config, make_federation
from tests.tlsserver import tls_server


def handshake(port: int, ca: Path, hostname: str) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=hostname),
    ):
        pass


@pytest.fixture
def fed(tmp_path: Path) -> FederationLayout:
    config = make_config()
    config.superlink.address = "link.example.org"
    config.superlink.sans = ["10.0.0.5", "127.0.0.1"]
    return make_federation(tmp_path / "fed", config)


def test_private_keys_are_0600(fed: FederationLayout) -> None:
    keys = [fed.ca_key, fed.server_key, *sorted(fed.nodes.glob("*.key"))]
    assert len(keys) == 5
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_server_certificate_extensions(fed: FederationLayout) -> None:
    cert = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    assert service.cert_sans(cert) == ["link.example.org", "localhost", "10.0.0.5", "127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


def test_leaf_never_outlives_ca() -> None:
    ca = CertificateAuthority.create("short", days=10)
    leaf = ca.issue_server_cert(["x.org"], days=825)
    assert leaf.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.federation
def test_handshake_with_right_ca_and_names(fed: FederationLayout) -> None:
    with tls_server(fed.server_cert, fed.server_key) as port:
        handshake(port, fed.ca_cert, "localhost")
        handshake(port, fed.ca_cert, "127.0.0.1")
        handshake(port, fed.ca_cert, "link.example.org")


@pytest.mark.federation
def test_handshake_fails_with_wrong_ca(fed: FederationLayout, tmp_path: Path) -> None:
    other = CertificateAuthority.create("other")
    other.write(tmp_path / "other.crt", tmp_path / "other.key")
    with tls_server(fed.server_cert, fed.server_key) as port, pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, tmp_path / "other.crt", "localhost")


@pytest.mark.federation
def test_handshake_fails_with_wrong_host_name(fed: FederationLayout) -> None:
    with (
        tls_server(fed.server_cert, fed.server_key) as port,
        pytest.raises(ssl.SSLCertVerificationError, match="match"),
    ):
        handshake(port, fed.ca_cert, "evil.example.org")


@pytest.mark.federation
def test_handshake_fails_with_expired_certificate(fed: FederationLayout, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(fed.ca_cert, fed.ca_key)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = ca.issue_server_cert(["localhost"], not_before=past, not_after=past + dt.timedelta(days=1))
    expired.write(tmp_path / "old.crt", tmp_path / "old.key")
    with (
        tls_server(tmp_path / "old.crt", tmp_path / "old.key") as port,
        pytest.raises(ssl.SSLCertVerificationError, match="expired"),
    ):
        handshake(port, fed.ca_cert, "localhost")


def test_ca_is_not_replaced(fed: FederationLayout) -> None:
    before = fed.ca_cert.read_bytes(), fed.ca_key.read_bytes()
    with pytest.raises(FlowerbedError, match="already exists"):
        service.init_ca(fed, "test")
    assert (fed.ca_cert.read_bytes(), fed.ca_key.read_bytes()) == before
    service.init_ca(fed, "test", force=True)
    assert fed.ca_cert.read_bytes() != before[0]
    assert stat.S_IMODE(fed.ca_key.stat().st_mode) == 0o600


def test_node_key_is_openssh_ec_p384_and_not_replaced(fed: FederationLayout) -> None:
    config = make_config()
    key = load_ssh_private_key(fed.node_key("inst-a").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
    assert fed.node_pub("inst-a").read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(FlowerbedError, match="already exists"):
        service.make_node_key(fed, config, "inst-a")
    with pytest.raises(FlowerbedError, match="unknown site 'nobody'"):
        service.make_node_key(fed, config, "nobody")


def test_show_lists_everything(fed: FederationLayout) -> None:
    config = make_config()
    rows = service.show(fed, config)
    assert [r.kind for r in rows] == ["CA", "server", "node key", "node key", "node key"]
    assert rows[1].days_left is not None and rows[1].days_left > 800
    assert rows[1].warning is None
    assert all(r.fingerprint.startswith("SHA256:") for r in rows)


def test_show_warns_when_expiring_soon(fed: FederationLayout) -> None:
    ca = CertificateAuthority.load(fed.ca_cert, fed.ca_key)
    now = dt.datetime.now(dt.UTC)
    ca.issue_server_cert(["localhost"], not_after=now + dt.timedelta(days=3, hours=1)).write(
        fed.server_cert, fed.server_key, overwrite=True
    )
    info = service.cert_info("server", fed.server_cert)
    assert info.warning == "expires in 3 days"
