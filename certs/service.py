"""What the ``flowerbed certs`` commands do, as functions that return values."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from flowerbed import audit
from flowerbed.certs.ca import CertificateAuthority
from flowerbed.certs.nodekeys import NodeKeyPair, load_public_key, public_fingerprint
from flowerbed.config import FederationConfig
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout

WARN_DAYS = 30


def init_ca(layout: FederationLayout, name: str, *, force: bool = False) -> Path:
    """Create the federation CA once; an existing CA is kept unless ``force``."""
    if (layout.ca_cert.exists() or layout.ca_key.exists()) and not force:
        raise FlowerbedError(
            f"a CA already exists in {layout.pki}: keeping it (every site kit trusts it); "
            "pass --force only if you mean to re-issue every certificate and kit"
        )
    ca = CertificateAuthority.create(f"{name} federation CA")
    ca.write(layout.ca_cert, layout.ca_key, overwrite=force)
    audit.append(layout.audit, audit.CERT, "coordinator", event="CA created" + (" again (--force)" if force else ""),
                 certificate_sha256=_fingerprint(layout.ca_cert))  # fmt: skip
    return layout.ca_cert


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def issue_server(layout: FederationLayout, config: FederationConfig) -> list[str]:
    """Issue (or re-issue) the gateway/SuperLink certificate for every configured SAN."""
    ca = CertificateAuthority.load(layout.ca_cert, layout.ca_key)
    names = config.superlink.all_sans()
    for local in ("localhost", "127.0.0.1"):
        # The gateway reaches the SuperLink on loopback and verifies it by name.
        if local not in names:
            names.append(local)
    issued = ca.issue_server_cert(names)
    issued.write(layout.server_cert, layout.server_key, overwrite=True)
    audit.append(layout.audit, audit.CERT, "coordinator", event="server certificate issued", names=names,
                 certificate_sha256=_fingerprint(layout.server_cert))  # fmt: skip
    return names


def make_node_key(layout: FederationLayout, config: FederationConfig, site: str, *, force: bool = False) -> Path:
    """Create ``SITE``'s node key pair once (OpenSSH EC P-384)."""
    config.site(site)
    private = layout.node_key(site)
    if private.exists() and not force:
        raise FlowerbedError(
            f"{private} already exists: the SuperLink knows its public key; "
            "pass --force to replace it (then restart `flowerbed superlink start`)"
        )
    NodeKeyPair.generate(f"{config.name}/{site}").write(private, layout.node_pub(site), overwrite=force)
    audit.append(layout.audit, audit.CERT, "coordinator", event="node key created", site=site,
                 public_key_sha256=_fingerprint(layout.node_pub(site)))  # fmt: skip
    return private


def ensure_all(layout: FederationLayout, config: FederationConfig) -> None:
    """Create whatever of CA, server certificate and node keys is missing (used by the demo)."""
    if not layout.ca_cert.exists():
        init_ca(layout, config.name)
    if not layout.server_cert.exists():
        issue_server(layout, config)
    for site in config.sites:
        if not layout.node_key(site.name).exists():
            make_node_key(layout, config, site.name)


@dataclass(frozen=True)
class CertInfo:
    """One row of ``flowerbed certs show``."""

    kind: str
    path: Path
    subject: str
    sans: list[str]
    fingerprint: str
    not_after: dt.datetime | None
    days_left: int | None

    @property
    def warning(self) -> str | None:
        """A line when the certificate expires within 30 days or has expired, else None."""
        if self.days_left is None:
            return None
        if self.days_left < 0:
            return "EXPIRED"
        if self.days_left < WARN_DAYS:
            return f"expires in {self.days_left} days"
        return None


def read_cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate with a clear error."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise FlowerbedError(f"{path} is missing") from None
    except ValueError as exc:
        raise FlowerbedError(f"{path} is not a PEM certificate: {exc}") from None


def cert_sans(cert: x509.Certificate) -> list[str]:
    """DNS and IP SANs of a certificate as strings."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def cert_info(kind: str, path: Path) -> CertInfo:
    """Subject, validity and days left of the certificate at ``path``."""
    cert = read_cert(path)
    left = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    return CertInfo(
        kind=kind,
        path=path,
        subject=cert.subject.rfc4514_string(),
        sans=cert_sans(cert),
        fingerprint="SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":"),
        not_after=cert.not_valid_after_utc,
        days_left=left,
    )


def show(layout: FederationLayout, config: FederationConfig) -> list[CertInfo]:
    """Every certificate and node key of the federation."""
    rows: list[CertInfo] = []
    if layout.ca_cert.exists():
        rows.append(cert_info("CA", layout.ca_cert))
    if layout.server_cert.exists():
        rows.append(cert_info("server", layout.server_cert))
    for site in config.sites:
        pub = layout.node_pub(site.name)
        if pub.exists():
            rows.append(
                CertInfo(
                    kind="node key",
                    path=pub,
                    subject=site.name,
                    sans=[],
                    fingerprint=public_fingerprint(load_public_key(pub)),
                    not_after=None,
                    days_left=None,
                )
            )
    if not rows:
        raise FlowerbedError(f"no certificates in {layout.root}: run `flowerbed certs init`")
    return rows


def renew_server(layout: FederationLayout, config: FederationConfig) -> tuple[list[str], int | None]:
    """Re-issue the gateway certificate from the same CA (sites keep their kits: they trust the CA).

    A running gateway (nginx) is told to reload it at once (SIGHUP): returns the names and its pid.
    """
    names = issue_server(layout, config)
    pid: int | None = None
    if layout.pidfile.is_file():
        pids = json.loads(layout.pidfile.read_text(encoding="utf-8")).get("processes", {})
        pid = pids.get("gateway (nginx)")
        if pid is not None:
            try:
                os.kill(int(pid), signal.SIGHUP)  # nginx re-reads its config and certificate files
            except ProcessLookupError:
                pid = None
    return names, pid
