"""A federation certificate authority in the style of trustme: objects that issue and write PEMs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowerbed.certs.files import write_private, write_public
from flowerbed.errors import FlowerbedError

CA_DAYS = 3650
SERVER_DAYS = 825


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def san_entry(name: str) -> x509.GeneralName:
    """``"10.0.0.5"`` becomes an IPAddress SAN, ``"link.example.org"`` a DNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, PEM-encoded (unencrypted: written 0600 by the caller)."""
        return _private_pem(self.key)

    def write(self, cert_path: Path, key_path: Path, *, overwrite: bool = False) -> None:
        """Write the key 0600 first, then the certificate."""
        write_private(key_path, self.key_pem, overwrite=overwrite)
        write_public(cert_path, self.cert_pem)


@dataclass(frozen=True)
class CertificateAuthority:
    """The federation CA (ECDSA P-384). Create it once; issue server certificates from it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str, *, days: int = CA_DAYS, organization: str = "flowerbed") -> CertificateAuthority:
        """A new self-signed CA certificate valid for ``days``."""
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(cert=cert, key=key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Read an existing CA; errors say which file is missing or broken."""
        for path in (cert_path, key_path):
            if not path.is_file():
                raise FlowerbedError(f"{path} is missing: run `flowerbed certs init` first")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise FlowerbedError(f"cannot read the CA in {cert_path.parent}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FlowerbedError(f"{key_path} is not an EC private key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise FlowerbedError(f"{key_path} does not belong to {cert_path}")
        return cls(cert=cert, key=key)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM-encoded (what sites get as ca.crt)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, cert_path: Path, key_path: Path, *, overwrite: bool = False) -> None:
        """Write the CA key (0600) and certificate."""
        write_private(key_path, _private_pem(self.key), overwrite=overwrite)
        write_public(cert_path, self.cert_pem)

    def issue_server_cert(
        self,
        names: list[str],
        *,
        days: int = SERVER_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCert:
        """A serverAuth certificate for every name in ``names`` (DNS or IP SANs).

        It never outlives the CA: ``not_after`` is capped at the CA's own expiry.
        ``not_before``/``not_after`` exist for tests of expired certificates.
        """
        if not names:
            raise FlowerbedError("a server certificate needs at least one host name or IP")
        key = ec.generate_private_key(ec.SECP384R1())
        now = _now()
        start = not_before or now - dt.timedelta(minutes=5)
        end = min(not_after or now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        if end <= start:
            raise FlowerbedError("the server certificate would expire before it starts")
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerbed"),
                        x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA384())
        )
        return IssuedCert(cert=cert, key=key)
