"""Checks before a SuperNode starts: data, CA, key, reachability, TLS identity and clock."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flowerbed.certs.files import check_private_mode
from flowerbed.certs.nodekeys import load_private_key
from flowerbed.certs.service import cert_sans, read_cert
from flowerbed.deploy.firewall_checklist import (
    FAIL,
    PASS,
    HopError,
    check_clock,
    decode_der,
    explain_untrusted,
    open_connection,
    proxy_for,
)
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.supernode.supervisor import SupernodeSpec


@dataclass(frozen=True)
class Check:
    """One preflight row."""

    name: str
    ok: bool
    detail: str


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a tuple, or a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlowerbedError(f"--superlink {address!r} must be HOST:PORT, e.g. link.example.org:9092")
    return host.strip("[]"), int(port)


def check_data(path: Path) -> Check:
    if not path.exists():
        return Check("data path", False, f"{path} does not exist: pass the folder or CSV with --data")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        return Check("data path", False, f"{path} is not readable by this user")
    return Check("data path", True, f"{path} ({'folder' if path.is_dir() else 'file'})")


def check_ca(ca: Path) -> Check:
    if not ca.is_file():
        return Check("CA certificate", False, f"{ca} is missing: use ca.crt from the site kit")
    try:
        cert = read_cert(ca)
    except FlowerbedError as exc:
        return Check("CA certificate", False, exc.message)
    return Check("CA certificate", True, cert.subject.rfc4514_string())


def check_key(key: Path) -> Check:
    if not key.is_file():
        return Check("node key", False, f"{key} is missing: use the SITE.key from the site kit")
    problem = check_private_mode(key)
    if problem:
        return Check("node key", False, problem)
    if not key.with_name(key.name + ".pub").is_file():
        return Check("node key", False, f"{key}.pub is missing: keep the .pub file next to the key")
    try:
        load_private_key(key)
    except FlowerbedError as exc:
        return Check("node key", False, exc.message)
    return Check("node key", True, f"{key} (mode 600)")


def _peer_cert(host: str, port: int, timeout_s: float, proxy: tuple[str, int] | None) -> x509.Certificate | None:
    """The server's certificate without verification (to explain a failed verification)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            open_connection(host, port, timeout_s, proxy) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _explain_verify_error(
    exc: ssl.SSLCertVerificationError, host: str, port: int, ca: Path, proxy: tuple[str, int] | None
) -> str:
    code = exc.verify_code
    peer = _peer_cert(host, port, 5.0, proxy)
    # X509_V_ERR_HOSTNAME_MISMATCH (62) and X509_V_ERR_IP_ADDRESS_MISMATCH (64)
    if code in (62, 64) or "mismatch" in str(exc.verify_message).lower():
        names = ", ".join(cert_sans(peer)) if peer else "unknown"
        return (
            f"the gateway's certificate does not name {host!r} (it names: {names}): connect with one "
            "of those names, or ask the coordinator to add it with `flowerbed certs server`"
        )
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        when = peer.not_valid_after_utc.date().isoformat() if peer else "?"
        return f"the gateway's certificate expired on {when}: ask the coordinator to run `flowerbed certs renew-server`"
    # A wrong --ca file, another federation's gateway, or TLS interception: the checklist tells them apart.
    der = peer.public_bytes(serialization.Encoding.DER) if peer else b""
    row = explain_untrusted("TLS", host, port, ca, decode_der(der) if der else {})
    return f"{row.detail}: {row.fix}"


def check_tls(host: str, port: int, ca: Path, timeout_s: float = 10.0) -> tuple[Check, Check]:
    """Reach (through HTTPS_PROXY when it applies, as the SuperNode connects), a verified TLS
    handshake and the clock skew against the gateway's Date header. A failure names its hop."""
    proxy = proxy_for(host)
    via = f" via proxy {proxy[0]}:{proxy[1]}" if proxy else ""
    try:
        raw = open_connection(host, port, timeout_s, proxy)
    except HopError as exc:
        hint = " (is the SuperLink up?)" if exc.hop == "tcp" else ""
        return Check("reach", False, f"{exc.message}{hint}: {exc.fix}"), Check("TLS", False, "not tried")
    reach = Check("reach", True, f"TCP {host}:{port} open{via}")
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = tls.recv(4096).decode("latin-1")
            received = time.time()
    except ssl.SSLCertVerificationError as exc:
        return reach, Check("TLS", False, _explain_verify_error(exc, host, port, ca, proxy))
    except (ssl.SSLError, OSError) as exc:
        return reach, Check("TLS", False, f"TLS handshake with {host}:{port}{via} failed: {exc}")
    detail = f"verified against {ca.name}"
    clock = check_clock(head, received)
    if clock.status == FAIL:
        return reach, Check("TLS", False, f"{clock.detail}: {clock.fix} and start again")
    if clock.status == PASS:
        detail += f", clock skew {clock.detail.split(' ')[0]} s"
    return reach, Check("TLS", True, detail)


def link_probe(spec: SupernodeSpec) -> Callable[[], tuple[bool, str]]:
    """The check the supervisor runs while Flower reports failed connection attempts."""
    host, port = parse_address(spec.superlink)

    def probe() -> tuple[bool, str]:
        reach, tls = check_tls(host, port, spec.ca, timeout_s=5.0)
        failed = next((c for c in (reach, tls) if not c.ok), None)
        return (True, reach.detail) if failed is None else (False, failed.detail)

    return probe


def run_preflight(superlink: str, ca: Path, key: Path, data: Path) -> list[Check]:
    """Every check, in order; network checks only run when CA and key are fine."""
    host, port = parse_address(superlink)
    checks = [check_data(data), check_ca(ca), check_key(key)]
    if checks[1].ok:
        checks.extend(check_tls(host, port, ca))
    return checks


def require(checks: list[Check]) -> None:
    """Raise with the first failed check's message."""
    for check in checks:
        if not check.ok:
            raise FlowerbedError(f"preflight: {check.name}: {check.detail}", exit_code=ExitCode.PREFLIGHT_FAILED)
