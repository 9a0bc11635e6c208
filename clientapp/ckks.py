"""A site's half of CKKS encrypted aggregation: its exchange key, the CKKS keys it holds, and its peers.

The site keeps in its ``he`` folder (node config ``he-dir``; the supervisor puts it in the SuperNode's
work folder): ``exchange.key`` (its X25519 key, made here, 0600), ``keys/KEYID.ckks`` (each CKKS secret
context it holds, 0600) and ``peers.json`` (each other site's exchange public key as first seen).

A peer's exchange key is trusted on first use and pinned: a later, different key for the same site is
refused (the coordinator passes the keys on and could otherwise put its own in their place). The
fingerprints are in the site's console and trail; sites that compare them with each other out of
band (``flowerbed supernode he-keys``) rule out a substitution at the first use as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flowerbed import ckks
from flowerbed.audit import ROUND, append_here
from flowerbed.certs.files import write_private
from flowerbed.errors import FlowerbedError
from flowerbed.protocol import CKKS_RECORD, CKKS_WRAPPED, HE_DIR_KEY, site_event

EXCHANGE_FILE, PEERS_FILE, KEYS_DIR = "exchange.key", "peers.json", "keys"


def he_dir(node_config: dict[str, Any]) -> Path:
    """This site's folder of HE keys (a SuperNode not started by the kit: ./he of its folder)."""
    return Path(str(node_config.get(HE_DIR_KEY) or "he")).expanduser().resolve()


def exchange_key(folder: Path) -> ckks.ExchangeKey:
    """This site's exchange key, made the first time it is needed."""
    return ckks.ExchangeKey.load_or_create(folder / EXCHANGE_FILE)


def held(folder: Path) -> list[str]:
    """The ids of the CKKS keys this site holds."""
    return sorted(p.stem for p in (folder / KEYS_DIR).glob("*.ckks"))


def _key_path(folder: Path, kid: str) -> Path:
    if not kid.isalnum():
        raise FlowerbedError(f"{kid!r} is no CKKS key id")
    return folder / KEYS_DIR / f"{kid}.ckks"


def pin(folder: Path, site: str, public: bytes) -> None:
    """Trust ``site``'s exchange key on first use; refuse a different one later (one line, with both fingerprints)."""
    path = folder / PEERS_FILE
    peers: dict[str, str] = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    known = peers.get(site)
    if known == public.hex():
        return
    if known is not None:
        raise FlowerbedError(
            f"site {site}'s exchange key changed: pinned {ckks.fingerprint(bytes.fromhex(known))}, now "
            f"{ckks.fingerprint(public)}; if {site} made a new one, remove its line from {path}, else the "
            "coordinator may be passing on a key of its own"
        )
    peers[site] = public.hex()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    write_private(tmp, json.dumps(peers, indent=2, sort_keys=True).encode("utf-8"))
    tmp.replace(path)
    site_event(f"pinned site {site}'s exchange key {ckks.fingerprint(public)} (first use)")


def keys_reply(folder: Path) -> RecordDict:
    """The answer to the coordinator's key query: this site's exchange public key and the keys it holds."""
    key = exchange_key(folder)
    record = ConfigRecord({"exchange-public": key.public, "held": held(folder) or [""]})
    return RecordDict({CKKS_RECORD: record})


def wrap_reply(folder: Path, site: str, asked: ConfigRecord, peers: ArrayRecord | None, run_id: int) -> RecordDict:
    """Make (key id "") or load the CKKS key, and wrap it for every site in ``peers``; its public context."""
    kid = str(asked.get("key-id", ""))
    if kid:
        path = _key_path(folder, kid)
        if not path.is_file():
            raise FlowerbedError(f"site {site} does not hold CKKS key {kid}")
        context = ckks.load_context(path.read_bytes())
    else:
        context = ckks.new_context()
        kid = ckks.key_id(context)
        write_private(_key_path(folder, kid), ckks.secret_bytes(context))
        site_event(f"made CKKS key {kid} for this run; its secret part stays at the sites")
    secret = ckks.secret_bytes(context)
    own = exchange_key(folder)
    wrapped: dict[str, Array] = {}
    for peer in sorted(peers or {}):
        public = peers[peer].numpy().tobytes()  # type: ignore[index]
        pin(folder, peer, public)
        blob = ckks.wrap(secret, own, public, kid=kid, sender=site, recipient=peer)
        wrapped[peer] = Array(np.frombuffer(blob, dtype=np.uint8).copy())
        append_here(ROUND, "clientapp", run_id=run_id, message="ckks key wrapped", key_id=kid, recipient=peer,
                    recipient_key=ckks.fingerprint(public))  # fmt: skip
    if wrapped:
        site_event(f"wrapped CKKS key {kid} for {', '.join(sorted(wrapped))}")
    record = ConfigRecord({"key-id": kid, "public-context": ckks.public_bytes(context), "exchange-public": own.public})
    return RecordDict({CKKS_RECORD: record, CKKS_WRAPPED: ArrayRecord(wrapped)})


def message_key(msg: Message, folder: Path, site: str, run_id: int) -> Any | None:
    """The CKKS secret context a message's model is under (None: the run is not under CKKS).

    Held already, or unwrapped from the message (its maker's exchange key pinned first) and kept.
    """
    record = msg.content.config_records.get(CKKS_RECORD)
    if record is None:
        return None
    kid = str(record.get("key-id", ""))
    path = _key_path(folder, kid)
    if path.is_file():
        return ckks.load_context(path.read_bytes())
    wrapped = msg.content.array_records.get(CKKS_WRAPPED)
    if wrapped is None or "wrapped" not in wrapped:
        raise FlowerbedError(f"site {site} holds no CKKS key {kid} and the coordinator sent none wrapped for it")
    maker, maker_public = str(record.get("maker", "")), bytes(record.get("maker-public", b""))  # type: ignore[arg-type]
    pin(folder, maker, maker_public)
    secret = ckks.unwrap(wrapped["wrapped"].numpy().tobytes(), exchange_key(folder), maker_public, kid=kid,
                         sender=maker, recipient=site)  # fmt: skip
    context = ckks.load_context(secret)
    if ckks.key_id(context) != kid:
        raise FlowerbedError(f"the CKKS key site {maker} wrapped for site {site} is not key {kid}")
    write_private(path, secret)
    append_here(ROUND, "clientapp", run_id=run_id, message="ckks key unwrapped", key_id=kid, maker=maker,
                maker_key=ckks.fingerprint(maker_public))  # fmt: skip
    site_event(f"received CKKS key {kid} from site {maker} (its exchange key {ckks.fingerprint(maker_public)})")
    return context


def plain_state(context: Any, arrays: ArrayRecord) -> dict[str, Any]:
    """The model's tensors from a message's arrays: decrypted under CKKS, else as they are."""
    import torch

    if not ckks.is_encrypted(arrays):
        return dict(arrays.to_torch_state_dict())
    manifest, chunks = ckks.from_record(arrays)
    return {name: torch.from_numpy(np.ascontiguousarray(value))
            for name, value in ckks.decrypt(context, manifest, chunks).items()}  # fmt: skip


def encrypted(context: Any, state: dict[str, Any]) -> ArrayRecord:
    """The trained model as ciphertexts (what leaves the site under CKKS)."""
    kid = ckks.key_id(context)
    manifest, chunks = ckks.encrypt(context, state, kid)
    return ckks.to_record(manifest, chunks)  # type: ignore[no-any-return]


def decrypt_file(source: Path, folder: Path, target: Path) -> ckks.Manifest:
    """Decrypt a model file of a CKKS run (the coordinator's ``final_model.pt``, ``best.pt`` or a checkpoint)
    with the key this site holds, into ``target`` (a plain state dict, 0600); its manifest."""
    import io

    import torch

    loaded = ckks.load_file(source)
    if loaded is None:
        raise FlowerbedError(f"{source} is no model encrypted with CKKS (a plain model needs no decryption)")
    manifest, chunks = loaded
    path = _key_path(folder, manifest.key_id)
    if not path.is_file():
        raise FlowerbedError(
            f"this site holds no CKKS key {manifest.key_id} (in {folder / KEYS_DIR}): decrypt it at a site that "
            "took part in the run, or pass that site's --workdir"
        )
    plain = ckks.decrypt(ckks.load_context(path.read_bytes()), manifest, chunks)
    buffer = io.BytesIO()
    torch.save({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in plain.items()}, buffer)
    write_private(target, buffer.getvalue(), overwrite=True)
    return manifest
