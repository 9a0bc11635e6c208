"""SuperNode authentication keys: EC P-384 in the OpenSSH format Flower's node auth reads."""

from __future__ import annotations

import hashlib
from base64 import b64decode, b64encode
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flowerbed.certs.files import write_private, write_public
from flowerbed.errors import FlowerbedError


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's key pair; the public half is registered at the SuperLink."""

    key: ec.EllipticCurvePrivateKey
    comment: str

    @classmethod
    def generate(cls, comment: str) -> NodeKeyPair:
        """A new P-384 node key pair with ``comment`` in its public OpenSSH line."""
        return cls(key=ec.generate_private_key(ec.SECP384R1()), comment=comment)

    @property
    def private_openssh(self) -> bytes:
        """The private key as OpenSSH-format bytes."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    @property
    def public_openssh(self) -> bytes:
        """The public key as one OpenSSH line, with its comment."""
        raw = self.key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return raw + b" " + self.comment.encode() + b"\n"

    def write(self, private_path: Path, public_path: Path, *, overwrite: bool = False) -> None:
        """Write the private key (0600) and the public key; an existing file is kept unless ``overwrite``."""
        write_private(private_path, self.private_openssh, overwrite=overwrite)
        write_public(public_path, self.public_openssh)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH EC public key file."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FlowerbedError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FlowerbedError(f"{path} is not an EC public key (Flower node auth needs NIST EC)")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an OpenSSH EC private key file, with a clear error when it is not one."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FlowerbedError(
            f"{path} is not an unencrypted OpenSSH private key ({exc}): "
            "use the key from the site kit or `flowerbed certs node SITE`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FlowerbedError(f"{path} is not an EC private key (Flower node auth needs NIST EC)")
    return key


def public_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = blob.split(b" ")[1]

    digest = hashlib.sha256(b64decode(raw)).digest()
    return "SHA256:" + b64encode(digest).decode().rstrip("=")
