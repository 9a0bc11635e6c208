"""The site's half of secure aggregation: Flower's ``secaggplus_mod`` around the kit's train handler.

A train message that carries SecAgg+ stage settings goes through Flower's mod: it makes the site's
keys, shares them, masks the update the train handler returns and answers the unmask stage. Every
other message goes straight to the handlers. Around Flower's mod this adds what the kit's interface
needs: the site's example count at setup (one ``max_weight`` for all sites, see
:mod:`flowerbed.serverapp.secure`), that ``max_weight`` before masking, a refusal or data error of
the handler passed on as the site's error reply (Flower's mod would fail on it), the site's name in
every reply, and the masked vector's size and sha256 in the site's audit trail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from flowerbed.audit import ROUND, append_here
from flowerbed.clientapp.data import DataError
from flowerbed.flower import compat
from flowerbed.protocol import (
    CKKS_RECORD,
    EXAMPLES_KEY,
    MAX_WEIGHT_KEY,
    REFUSED_CODE,
    SECURE_ONLY_KEY,
    TRAIN_ARRAYS,
    TRAIN_CONFIG,
    masked_digest,
    site_event,
)

INSPECT_ENV = "FLOWERBED_SECAGG_INSPECT"  # at a site: where its ClientApp writes the changes it masked
KEPT = "flowerbed-secagg"  # the node's run state: what the site keeps between SecAgg+ stages
POLICY_CODE = REFUSED_CODE  # the run's settings break the site's own policy: refused, as unapproved code is


def is_secure(msg: Message) -> bool:
    """Whether a message is one of SecAgg+'s four train stages."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def global_state(msg: Message, names: list[str]) -> dict[str, torch.Tensor]:
    """The global model of a SecAgg+ train message, by the task model's parameter names (same order)."""
    record = msg.content.array_records[TRAIN_ARRAYS]
    arrays = [record[key] for key in sorted(record.keys(), key=int)]
    if len(arrays) != len(names):
        raise ValueError(f"the global model has {len(arrays)} arrays, this site's model {len(names)}")
    return {name: torch.from_numpy(bytes_to_ndarray(a.data).copy()) for name, a in zip(names, arrays, strict=True)}


def clipped(change: list[np.ndarray], examples: int, max_weight: float, clipping_range: float) -> int:
    """How many values of a site's weighted change SecAgg+ will clip to +-``clipping_range``."""
    ratio = examples / max_weight if max_weight > 0 else 1.0
    return int(sum(int(np.count_nonzero(np.abs(a.astype(np.float64) * ratio) > clipping_range)) for a in change))


class _HandlerError(Exception):
    """The train handler answered with an error (a refusal, a data error): passed on as the reply."""

    def __init__(self, reply: Message) -> None:
        super().__init__(str(reply.error.reason))
        self.reply = reply


def _examples(context: Context, count_examples: Callable[[Context], int]) -> int:
    """The site's example count, read from its data once per run (the run's node state keeps it)."""
    kept = context.state.config_records.get(KEPT)
    value = kept.get(EXAMPLES_KEY) if kept is not None else None
    if isinstance(value, int):
        return value
    count = count_examples(context)
    context.state.config_records[KEPT] = ConfigRecord({EXAMPLES_KEY: count})
    return count


def make_secure_mod(count_examples: Callable[[Context], int], site: Callable[[Context], str]) -> Any:
    """A ClientApp mod: Flower's SecAgg+ for its messages, nothing for the others."""

    def secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if not is_secure(msg):
            return call_next(msg, context)
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
        if stage == Stage.COLLECT_MASKED_VECTORS:
            weight = msg.content.config_records[TRAIN_CONFIG].get(MAX_WEIGHT_KEY)
            saved = context.state.config_records.get(RECORD_KEY_STATE)
            if isinstance(weight, float) and saved is not None:
                saved["max_weight"] = weight

        def handler(inner: Message, ctx: Context) -> Message:
            reply = call_next(inner, ctx)
            if reply.has_error():
                raise _HandlerError(reply)
            return reply

        try:
            reply: Message = compat.secaggplus_mod(msg, context, handler)
        except _HandlerError as exc:
            return Message(exc.reply.error, reply_to=msg)
        content = reply.content
        if "site" not in content.config_records:
            content.config_records["site"] = ConfigRecord({"site-name": site(context)})
        if stage == Stage.SETUP:
            with contextlib.suppress(DataError, OSError):  # the train stage reports it, with its reason
                content.config_records[RECORD_KEY_CONFIGS][EXAMPLES_KEY] = _examples(context, count_examples)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            size, sha256 = masked_digest(reply)
            server_round = msg.content.config_records[TRAIN_CONFIG].get("server-round")
            append_here(ROUND, "clientapp", run_id=context.run_id, round=server_round, message="secagg-masked",
                        masked_bytes=size, masked_sha256=sha256)  # fmt: skip
            site_event(f"masked the update with SecAgg+ ({size / 1e3:.1f} kB, sha256 {sha256[:12]}): the "
                       "coordinator learns only the sum of the sites' updates")  # fmt: skip
        return reply

    return secure_mod


def inspect_change(site: str, server_round: int, change: dict[str, np.ndarray]) -> None:
    """With ``FLOWERBED_SECAGG_INSPECT=DIR`` at the site (a check for its auditors and tests): the change
    it handed to SecAgg+ in this round, in the clear, into DIR at the site; nothing of it is sent."""
    folder = os.environ.get(INSPECT_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        np.savez(Path(folder) / f"site-{site}-round-{server_round}.npz", *change.values())  # arr_0 ... in model order


def secure_only_refusal(msg: Message, node_config: dict[str, Any], site: str) -> str | None:
    """Why a site that trains only under secure aggregation refuses a plain train message (None: it does not)."""
    if str(node_config.get(SECURE_ONLY_KEY, "")).lower() != "true" or is_secure(msg):
        return None
    if CKKS_RECORD in msg.content.config_records:  # CKKS: only ciphertexts leave the site
        return None
    return (
        f"site {site}: trains only in runs with secure aggregation (require_secure_aggregation in its site.toml), "
        "so its update never reaches the coordinator alone: run with --secure-aggregation secagg+ (or ckks)"
    )
