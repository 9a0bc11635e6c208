"""CKKS encrypted aggregation at the coordinator: keys passed on, ciphertexts added, nothing decrypted.

Before a round, every site that has no CKKS key yet is asked for its exchange public key; the first
site (by name) makes the run's key and wraps it for the others, or, once the key exists, a site that
holds it wraps it for a newcomer (:mod:`flowerbed.clientapp.ckks`). The coordinator keeps the public
context (parameters only), the sites' exchange public keys and the wrapped keys, opaque, in the run
folder (``ckks.json``), and records each key event with fingerprints in its audit trail.

Each round every site decrypts the global model (round 1's initial model comes in the clear: it was
made from a seed, with no site's data in it), trains, and sends its model encrypted; the ServerApp
adds the ciphertexts, each scaled by the site's share of the round's examples (FedAvg), and the sum
is the next global model, in ciphertext. Checkpoints, ``best.pt`` and ``final_model.pt`` at the
coordinator are ciphertexts; a site decrypts the final model with ``flowerbed supernode decrypt-model``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flowerbed import ckks
from flowerbed.audit import RUN, append_here
from flowerbed.errors import FlowerbedError
from flowerbed.flower import compat
from flowerbed.protocol import CKKS_KEYS_KEY, CKKS_PEERS, CKKS_RECORD, CKKS_WRAP_KEY, CKKS_WRAPPED
from flowerbed.runfolder import read_keyring, write_keyring
from flowerbed.serverapp.loop import Clock, Replies, RoundState, exchange, split_replies


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _raw(text: object) -> bytes:
    return base64.b64decode(str(text))


@dataclass
class Keyring:
    """What the coordinator holds of a run's CKKS key: nothing that decrypts."""

    kid: str = ""
    public: bytes = b""  # the public context: parameters only
    maker: str = ""
    maker_public: bytes = b""
    exchange: dict[str, bytes] = field(default_factory=dict)  # site -> its exchange public key
    wrapped: dict[str, bytes] = field(default_factory=dict)  # site -> the key wrapped for it (opaque)
    holders: set[str] = field(default_factory=set)  # sites known to hold the key
    wrapped_by: dict[str, str] = field(default_factory=dict)  # site -> the holder that wrapped its key

    def to_json(self) -> dict[str, Any]:
        """The keyring as kept in the run folder."""
        return {"key_id": self.kid, "public_context": _b64(self.public), "maker": self.maker,
                "maker_public": _b64(self.maker_public), "exchange": {s: _b64(k) for s, k in self.exchange.items()},
                "wrapped": {s: _b64(k) for s, k in self.wrapped.items()}, "holders": sorted(self.holders),
                "wrapped_by": dict(self.wrapped_by),
                "fingerprints": {s: ckks.fingerprint(k) for s, k in self.exchange.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Keyring:
        """The keyring from :meth:`to_json`."""
        return cls(str(data.get("key_id", "")), _raw(data.get("public_context", "")), str(data.get("maker", "")),
                   _raw(data.get("maker_public", "")), {s: _raw(k) for s, k in data.get("exchange", {}).items()},
                   {s: _raw(k) for s, k in data.get("wrapped", {}).items()}, set(data.get("holders", [])),
                   dict(data.get("wrapped_by", {})))  # fmt: skip

    def attach(self, messages: list[Message], sites: dict[int, str]) -> None:
        """Name the key in each message, and add the key wrapped for a site that does not hold it yet."""
        for message in messages:
            site = sites.get(message.metadata.dst_node_id, "")
            # Flower's strategies give all their messages one RecordDict: each gets its own, for its own key.
            message.content = RecordDict(dict(message.content.items()))
            wrapper = self.wrapped_by.get(site, self.maker)  # the site unwraps with its wrapper's exchange key
            public = self.exchange.get(wrapper) or self.maker_public
            message.content[CKKS_RECORD] = ConfigRecord({"key-id": self.kid, "maker": wrapper, "maker-public": public})
            if site not in self.holders and site in self.wrapped:
                message.content[CKKS_WRAPPED] = ArrayRecord(
                    {"wrapped": Array(np.frombuffer(self.wrapped[site], dtype=np.uint8).copy())}
                )


def load(out_dir: Path) -> Keyring:
    """The run's keyring (empty for a run that has no key yet)."""
    data = read_keyring(out_dir)
    return Keyring.from_json(data) if data else Keyring()


def _ask(grid: Grid, state: RoundState, nodes: list[int], config: dict[str, Any], *, clock: Clock,
         records: dict[str, Any] | None = None) -> Replies:  # fmt: skip
    messages = []
    for node in nodes:
        content = RecordDict({"config": ConfigRecord(config | {"server-round": state.server_round})})
        for name, record in (records or {}).items():
            content[name] = record
        messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.QUERY,
                                group_id=str(state.server_round)))  # fmt: skip
    replies = exchange(grid, messages, state.settings.round_timeout_s, clock, watch=state.dark.watch,
                       on_dark=state.dark.noted(state.server_round))  # fmt: skip
    return split_replies(messages, replies, state.sites)


def _wrap(
    grid: Grid, state: RoundState, keyring: Keyring, holder: int, peers: dict[str, bytes], *, clock: Clock
) -> list[str]:
    """Ask ``holder`` to make (no key yet) or load the key and wrap it for ``peers``; the errors."""
    record = ConfigRecord({"key-id": keyring.kid})
    arrays = ArrayRecord({site: Array(np.frombuffer(pub, dtype=np.uint8).copy()) for site, pub in peers.items()})
    got = _ask(
        grid, state, [holder], {CKKS_WRAP_KEY: 1}, clock=clock, records={CKKS_RECORD: record, CKKS_PEERS: arrays}
    )
    if not got.valid:
        return got.errors
    reply, site = got.valid[0], got.sites_unsorted[0]
    answer = reply.content.config_records[CKKS_RECORD]
    wrapped = reply.content.array_records.get(CKKS_WRAPPED)
    if not keyring.kid:
        public = bytes(answer["public-context"])  # type: ignore[arg-type]
        kid = str(answer.get("key-id", ""))
        if not (len(kid) == 16 and kid.isalnum()) or ckks.load_context(public).is_private():
            return [f"site {site}: its CKKS key has no valid id, or its public context holds a secret key"]
        keyring.kid, keyring.public, keyring.maker = str(answer["key-id"]), public, site
        keyring.maker_public = bytes(answer["exchange-public"])  # type: ignore[arg-type]
        keyring.holders.add(site)
        append_here(RUN, "serverapp", event="ckks key made", run=state.history.out_dir.name, key_id=keyring.kid,
                    maker=site, maker_key=ckks.fingerprint(keyring.maker_public))  # fmt: skip
    keyring.exchange[site] = bytes(answer["exchange-public"])  # type: ignore[arg-type]
    for peer, public in peers.items():
        if wrapped is not None and peer in wrapped:
            keyring.wrapped[peer] = wrapped[peer].numpy().tobytes()
            keyring.wrapped_by[peer] = site
            append_here(RUN, "serverapp", event="ckks key wrapped", run=state.history.out_dir.name,
                        key_id=keyring.kid, by=site, recipient=peer,
                        recipient_key=ckks.fingerprint(public))  # fmt: skip
    return []


def prepare_round(
    grid: Grid, state: RoundState, nodes: list[int], revoked: set[int], clock: Clock
) -> tuple[list[int], Replies]:
    """Make sure every site of ``nodes`` holds the key or has it wrapped for it: the nodes that do, and the
    failures (as a round's) of those that do not. A revoked site is never given the key (and its wrapped
    copy is dropped from the keyring)."""
    keyring: Keyring = state.ckks
    sites = state.sites
    for node in revoked:
        name = sites.by_node.get(node) or sites.registered.get(node)
        if name is not None and keyring.wrapped.pop(name, None) is not None:
            append_here(RUN, "serverapp", event="ckks key withdrawn", run=state.history.out_dir.name,
                        key_id=keyring.kid, site=name)  # fmt: skip
    needing = [
        n for n in nodes if n not in revoked and (sites.by_node.get(n) not in keyring.holders | set(keyring.wrapped))
    ]
    errors: list[str] = []
    absent: list[str] = []
    if not needing:
        return [n for n in nodes if n not in revoked], Replies([], errors, absent)
    unknown = [n for n in needing if sites.by_node.get(n) not in keyring.exchange]
    if unknown:
        got = _ask(grid, state, unknown, {CKKS_KEYS_KEY: 1}, clock=clock)
        errors += got.errors
        absent += got.absent
        for reply, site in zip(got.valid, got.sites_unsorted, strict=True):
            answer = reply.content.config_records[CKKS_RECORD]
            keyring.exchange[site] = bytes(answer["exchange-public"])  # type: ignore[arg-type]
            held = answer.get("held", [])
            if keyring.kid and isinstance(held, list) and keyring.kid in held:
                keyring.holders.add(site)  # a site that kept the key (a resumed run)
    named = {n: sites.by_node.get(n) for n in needing}
    peers = {s: keyring.exchange[s] for s in named.values() if s in keyring.exchange and s not in keyring.holders}
    if not keyring.kid:
        candidates = sorted((s, n) for n, s in named.items() if s in keyring.exchange and s is not None)
        if not candidates:
            return [], Replies([], errors, absent)
        maker, maker_node = candidates[0]
        peers.pop(maker, None)
        errors += _wrap(grid, state, keyring, maker_node, peers, clock=clock)
    elif peers:
        present = {s: n for n, s in sites.by_node.items() if n in nodes and s in keyring.holders}
        holder = present.get(keyring.maker) or next(iter(present.values()), None)
        if holder is None:
            errors += [f"site {s}: no site that holds CKKS key {keyring.kid} is here to wrap it for it" for s in peers]
        else:
            errors += _wrap(grid, state, keyring, holder, peers, clock=clock)
    write_keyring(state.history.out_dir, keyring.to_json())
    ready = keyring.holders | set(keyring.wrapped)
    return [n for n in nodes if n not in revoked and sites.by_node.get(n) in ready], Replies([], errors, absent)


def add(state: RoundState, got: Replies) -> tuple[ArrayRecord | None, Any]:
    """The new global model in ciphertext: the sites' encrypted models, each scaled by its share of the
    examples, added; and their metrics (in the clear). A reply that is no model under the run's key is
    dropped with a line naming its site."""
    keyring: Keyring = state.ckks
    keep: list[tuple[Message, str, ckks.Manifest, list[bytes]]] = []
    inspect(state, got)
    for reply, site in zip(got.valid, got.sites_unsorted, strict=True):
        arrays = reply.content.array_records.get("arrays")
        problem = None
        try:
            manifest, chunks = ckks.from_record(arrays)
            if manifest.key_id != keyring.kid:
                problem = f"its model is under CKKS key {manifest.key_id}, not the run's {keyring.kid}"
            elif keep and not manifest.same_model(keep[0][2]):
                problem = "its encrypted model has other tensors than the other sites'"
        except (FlowerbedError, KeyError, ValueError) as exc:
            problem = f"its reply is not a model encrypted with CKKS ({exc})"
        if problem is not None:
            got.errors.append(f"site {site}: {problem}; dropped")
            compat.log(WARNING, "site %s: %s; dropped from this round", site, problem)
            continue
        keep.append((reply, site, manifest, chunks))
    got.valid = [k[0] for k in keep]
    got.sites_unsorted = [k[1] for k in keep]
    got.sites = sorted(got.sites_unsorted)
    keyring.holders |= set(got.sites_unsorted)
    write_keyring(state.history.out_dir, keyring.to_json())
    if not keep:
        return None, None
    examples = [max(int(got.examples.get(site, 0)), 0) for _, site, _, _ in keep]
    total = sum(examples) or len(keep)
    weights = [(n / total if sum(examples) else 1 / len(keep)) for n in examples]
    public = ckks.load_context(keyring.public)
    summed = ckks.weighted_sum(public, [(w, k[3]) for w, k in zip(weights, keep, strict=True)])
    got.masked = {site: ckks.digest(chunks)[1] for _, site, _, chunks in keep}
    records = [RecordDict({"metrics": r.content.metric_records["metrics"]}) for r in got.valid]
    metrics = compat.aggregate_metricrecords(records, "num-examples")
    compat.log(
        INFO, "round %s: added %s encrypted models under CKKS key %s", state.server_round, len(keep), keyring.kid
    )
    return ckks.to_record(keep[0][2], summed), metrics


def inspect(state: RoundState, got: Replies) -> None:
    """With ``secagg_inspect = DIR``: every array each reply carried, by name, dtype and size, one JSON line
    per site and round in DIR/received.jsonl (what an auditor checks: only ciphertext reached the ServerApp)."""
    folder = state.settings.secagg_inspect
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with (Path(folder) / "received.jsonl").open("a", encoding="utf-8") as out:
        for reply, site in zip(got.valid, got.sites_unsorted, strict=True):
            arrays = {f"{record}/{name}": [array.dtype, array.shape, len(array.data)]
                      for record, content in reply.content.array_records.items()
                      for name, array in content.items()}  # fmt: skip
            out.write(json.dumps({"round": state.server_round, "site": site, "arrays": arrays}) + "\n")
