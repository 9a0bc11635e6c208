"""CKKS encrypted aggregation (TenSEAL): what the sites encrypt, what the coordinator adds, and the keys.

- **The model in ciphertext.** A model's tensors are flattened, in their order, into slices of
  :data:`SLOTS` values; each slice is one CKKS ciphertext. With the :class:`Manifest` (names, shapes,
  dtypes and the key's id) they travel as one :class:`~flwr.app.ArrayRecord` of uint8 arrays
  (:func:`to_record`), so Flower's transport, the kit's checkpoints and resume carry them as they
  carry a plain model, and a checkpoint on the coordinator's disk is ciphertext.
- **The coordinator adds.** :func:`weighted_sum` scales each site's ciphertexts by its public weight
  (its share of the round's examples) and adds them, with the *public context*: the scheme's
  parameters only, no secret, public, relinearization or Galois key (:func:`public_bytes`).
- **Keys never pass the coordinator in the clear.** One site makes the CKKS secret context
  (:func:`new_context`); it is wrapped for every other site with AES-256-GCM under a key both sites
  derive by X25519 and HKDF-SHA256 from their *exchange keys* (:func:`wrap`, :func:`unwrap`). A site's
  exchange key is made at that site (:class:`ExchangeKey`, 0600): not its node key, which the
  coordinator made with the kit and may still hold. The wrapped keys cross the coordinator as opaque
  bytes.

TenSEAL is an optional extra (``pip install 'flowerbed[he]'``); :func:`tenseal` says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.certs.files import write_private
from flowerbed.errors import FlowerbedError

POLY_DEGREE = 8192  # CKKS ring degree: 128-bit security with these 200 bits of modulus
COEFF_BITS = (60, 40, 40, 60)  # one multiplication level: the coordinator's scaling by a public weight
SCALE_BITS = 40
SLOTS = POLY_DEGREE // 2  # values per ciphertext
PREFIX = "ckks/"  # the record's array names: ckks/manifest, ckks/00000, ckks/00001, ...
MANIFEST = PREFIX + "manifest"
WRAP_INFO = b"flowerbed ckks key wrap v1"
REQUIREMENT = "tenseal>=0.3.18,<0.4"  # the `he` extra: what a bundle adds for ckks runs


def tenseal() -> Any:
    """The TenSEAL module, or a one-line error that says how to install it."""
    try:
        import tenseal as ts
    except ImportError:
        raise FlowerbedError(
            "secure_aggregation = 'ckks' needs TenSEAL, which is not installed here: pip install 'flowerbed[he]' "
            "(or tenseal==0.3.18; a site without a wheel for its platform cannot take part in a ckks run)"
        ) from None
    return ts


def available() -> bool:
    """Whether TenSEAL can be imported here."""
    try:
        tenseal()
    except FlowerbedError:
        return False
    return True


@dataclass(frozen=True)
class Manifest:
    """What the ciphertexts hold: each tensor's name, shape and dtype, in order, and the key's id."""

    key_id: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        """The number of values over all tensors."""
        return sum(int(np.prod(shape)) for shape in self.shapes)

    @property
    def chunks(self) -> int:
        """The number of ciphertexts that hold them."""
        return max(1, -(-self.size // SLOTS))

    def to_bytes(self) -> bytes:
        """The manifest as JSON bytes."""
        data = {"key_id": self.key_id, "names": self.names, "shapes": self.shapes, "dtypes": self.dtypes}
        return json.dumps(data).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """The manifest from :meth:`to_bytes`'s JSON."""
        raw = json.loads(data.decode("utf-8"))
        return cls(str(raw["key_id"]), tuple(raw["names"]), tuple(tuple(int(d) for d in s) for s in raw["shapes"]),
                   tuple(raw["dtypes"]))  # fmt: skip

    def same_model(self, other: Manifest) -> bool:
        """Whether ``other`` describes the same tensors under the same key."""
        return self == other


def new_context() -> Any:
    """A new CKKS context with its secret key (made at a site, never at the coordinator)."""
    ts = tenseal()
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_DEGREE, coeff_mod_bit_sizes=list(COEFF_BITS))
    context.global_scale = 2**SCALE_BITS
    return context


def secret_bytes(context: Any) -> bytes:
    """The context a site keeps: parameters, public key and secret key (what is wrapped for other sites)."""
    return bytes(
        context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    )


def public_bytes(context: Any) -> bytes:
    """The context the coordinator holds: the scheme's parameters only (adding and scaling need no key)."""
    return bytes(
        context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    )


def key_id(context: Any) -> str:
    """The short id of a CKKS key: the first 16 hex digits of the sha256 of its public key (which only the
    sites hold; the public context is the same for every key of these parameters)."""
    public_key = context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                   save_relin_keys=False)  # fmt: skip
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def load_context(data: bytes) -> Any:
    """A context from :func:`secret_bytes` or :func:`public_bytes`."""
    return tenseal().context_from(data)


def flatten(
    state: Mapping[str, Any],
) -> tuple[np.ndarray, tuple[str, ...], tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """All tensors' values in one float64 vector, with their names, shapes and dtypes."""
    arrays = [
        np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value) for value in state.values()
    ]
    vector = np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    return vector, tuple(state), tuple(tuple(a.shape) for a in arrays), tuple(str(a.dtype) for a in arrays)


def encrypt(context: Any, state: Mapping[str, Any], kid: str) -> tuple[Manifest, list[bytes]]:
    """A model's tensors (numpy arrays or torch tensors) as CKKS ciphertexts of :data:`SLOTS` values each."""
    ts = tenseal()
    vector, names, shapes, dtypes = flatten(state)
    manifest = Manifest(kid, names, shapes, dtypes)
    chunks = [bytes(ts.ckks_vector(context, vector[i : i + SLOTS].tolist()).serialize())
              for i in range(0, max(vector.size, 1), SLOTS)]  # fmt: skip
    return manifest, chunks


def decrypt(context: Any, manifest: Manifest, chunks: Sequence[bytes]) -> dict[str, np.ndarray]:
    """The tensors back from their ciphertexts (needs the secret context)."""
    ts = tenseal()
    if len(chunks) != manifest.chunks:
        raise FlowerbedError(f"the encrypted model has {len(chunks)} ciphertexts, its manifest says {manifest.chunks}")
    values = np.concatenate([np.asarray(ts.ckks_vector_from(context, chunk).decrypt(), dtype=np.float64)
                             for chunk in chunks])[: manifest.size]  # fmt: skip
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype in zip(manifest.names, manifest.shapes, manifest.dtypes, strict=True):
        count = int(np.prod(shape))
        part = values[offset : offset + count].reshape(shape)
        out[name] = np.rint(part).astype(dtype) if np.dtype(dtype).kind in "iub" else part.astype(dtype)
        offset += count
    return out


def weighted_sum(public_context: Any, parts: Sequence[tuple[float, Sequence[bytes]]]) -> list[bytes]:
    """Sum over sites of weight x ciphertexts, slice by slice, with the public context only (no key)."""
    ts = tenseal()
    if not parts:
        raise FlowerbedError("no encrypted update to add")
    count = len(parts[0][1])
    if any(len(chunks) != count for _, chunks in parts):
        raise FlowerbedError("the encrypted updates have different numbers of ciphertexts")
    out = []
    for index in range(count):
        total = None
        for weight, chunks in parts:
            term = ts.ckks_vector_from(public_context, chunks[index]) * float(weight)
            total = term if total is None else total + term
        out.append(bytes(total.serialize()))  # type: ignore[union-attr]
    return out


def to_record(manifest: Manifest, chunks: Sequence[bytes]) -> Any:
    """The encrypted model as one ArrayRecord of uint8 arrays: its manifest, then each ciphertext."""
    from flwr.app import Array, ArrayRecord

    arrays = {MANIFEST: Array(np.frombuffer(manifest.to_bytes(), dtype=np.uint8).copy())}
    for index, chunk in enumerate(chunks):
        arrays[f"{PREFIX}{index:05d}"] = Array(np.frombuffer(chunk, dtype=np.uint8).copy())
    return ArrayRecord(arrays)


def is_encrypted(record: Any) -> bool:
    """Whether an ArrayRecord holds an encrypted model (:func:`to_record`)."""
    return record is not None and MANIFEST in record


def from_record(record: Any) -> tuple[Manifest, list[bytes]]:
    """The manifest and ciphertexts of :func:`to_record`'s record."""
    if not is_encrypted(record):
        raise FlowerbedError("the model is not encrypted (no ckks/manifest)")
    manifest = Manifest.from_bytes(record[MANIFEST].numpy().tobytes())
    names = sorted(name for name in record if name != MANIFEST and name.startswith(PREFIX))
    return manifest, [record[name].numpy().tobytes() for name in names]


def digest(chunks: Sequence[bytes]) -> tuple[int, str]:
    """Bytes and sha256 of ciphertexts (what a site sent, what the coordinator holds of its model)."""
    hashed = hashlib.sha256()
    for chunk in chunks:
        hashed.update(chunk)
    return sum(len(chunk) for chunk in chunks), hashed.hexdigest()


def load_file(path: Path) -> tuple[Manifest, list[bytes]] | None:
    """The manifest and ciphertexts of a model file that holds them (None: a plain model, or no model file).

    The coordinator's checkpoints, ``best.pt`` and ``final_model.pt`` of a ckks run are :func:`to_record`'s
    record saved as a torch state dict; :func:`from_record` reads that as it reads the record.
    """
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError, EOFError):
        return None
    if not isinstance(state, dict) or not is_encrypted(state):
        return None
    return from_record(state)


def manifest_of_file(path: Path) -> Manifest | None:
    """The manifest of a model file that holds ciphertexts (None: a plain model, or no model file)."""
    loaded = load_file(path)
    return loaded[0] if loaded is not None else None


def fingerprint(public: bytes) -> str:
    """A public key's fingerprint for people to compare: SHA256 in hex groups (like an SSH fingerprint)."""
    digest = hashlib.sha256(public).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


@dataclass(frozen=True)
class ExchangeKey:
    """A site's own X25519 key for receiving the CKKS key from another site (never the kit's node key)."""

    private: Any  # X25519PrivateKey

    @classmethod
    def load_or_create(cls, path: Path) -> ExchangeKey:
        """The key in ``path`` (raw 32 bytes, 0600), made there the first time."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        if path.is_file():
            return cls(X25519PrivateKey.from_private_bytes(path.read_bytes()))
        from cryptography.hazmat.primitives import serialization

        key = X25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())  # fmt: skip
        write_private(path, raw)
        return cls(key)

    @property
    def public(self) -> bytes:
        """The public half, raw 32 bytes (sent to the coordinator, which passes it on)."""
        from cryptography.hazmat.primitives import serialization

        return bytes(self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _wrapping_key(own: ExchangeKey, peer_public: bytes, kid: str, sender: str, recipient: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"|".join([WRAP_INFO, kid.encode(), sender.encode(), recipient.encode()])
    return bytes(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared))


def wrap(secret: bytes, own: ExchangeKey, peer_public: bytes, *, kid: str, sender: str, recipient: str) -> bytes:
    """``secret`` (a CKKS secret context) encrypted for ``recipient``: nonce + AES-256-GCM ciphertext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _wrapping_key(own, peer_public, kid, sender, recipient)
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, secret, f"{kid}|{sender}|{recipient}".encode())


def unwrap(blob: bytes, own: ExchangeKey, peer_public: bytes, *, kid: str, sender: str, recipient: str) -> bytes:
    """The CKKS secret context that ``sender`` wrapped for this site (``recipient``), or a one-line error."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _wrapping_key(own, peer_public, kid, sender, recipient)
    try:
        return bytes(AESGCM(key).decrypt(blob[:12], blob[12:], f"{kid}|{sender}|{recipient}".encode()))
    except (InvalidTag, ValueError):
        raise FlowerbedError(
            f"the CKKS key {kid} wrapped by site {sender} for site {recipient} does not open with this site's "
            "exchange key: it was made for another key or changed on the way"
        ) from None
