"""Secure aggregation for the kit's task interface: Flower's own SecAgg+ stages, driven one round at a time.

flwr 1.42 offers SecAgg+ only for its legacy API (``SecAggPlusWorkflow`` over a ``LegacyContext``
and a legacy strategy). This module runs that workflow's four stages (setup, share keys, collect
masked vectors, unmask) for one kit round, with the few parts of a legacy context they read: the
round, the global parameters, a strategy whose ``configure_fit`` hands out the kit's train
instructions and whose ``aggregate_fit`` takes the unmasked sum. The protocol itself, its
cryptography and its quantization are Flower's.

What each site sends is the *change* of the model (trained minus global), so Flower's clipping to
+-``clipping_range`` rarely bites (a model's own weights may well exceed 8; a round's change of them
hardly); the ServerApp adds the unmasked weighted mean of the changes to the global model, which is
FedAvg. The weight of each site (its number of training examples) is masked with its update;
``max_weight`` is set to the largest count the sites announced at setup, so no weight exceeds it
and the quantization keeps its precision.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from flowerbed.config import RunSettings
from flowerbed.flower.secagg import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
    LegacyContext,
    SecAggPlusWorkflow,
    WorkflowKey,
    WorkflowState,
)
from flowerbed.protocol import EXAMPLES_KEY, MAX_WEIGHT_KEY, TRAIN_CONFIG, masked_digest

# What a site adds to its setup reply: how many examples it trains on (its FedAvg weight, which the
# run's metrics report in the clear anyway), so that one max_weight fits every site.
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")

Send = Callable[[list[Message], float], list[Message]]


@dataclass
class Exchange:
    """One stage's messages and the replies that came back."""

    stage: str
    messages: list[Message]
    replies: list[Message]


@dataclass
class SecureRound:
    """One securely aggregated round: the new global model (None when the protocol halted)."""

    arrays: ArrayRecord | None
    exchanges: list[Exchange]
    halted: str | None = None  # the stage at which the protocol stopped, and why
    received: dict[int, tuple[int, str]] = field(default_factory=dict)  # node -> bytes, sha256 of its masked vector

    @property
    def train(self) -> Exchange | None:
        """The exchange that carried the train instructions (its replies hold the sites' metrics)."""
        return next((e for e in self.exchanges if e.stage == STAGES[2]), None)


def protocol_sizes(nodes: int, threshold: float) -> tuple[int, int]:
    """The number of key shares and the reconstruction threshold Flower's workflow will use.

    Every site is every other site's neighbour (consortia are small): shares = nodes, never an even
    number below the number of sites (Flower's clients crash on one). Threshold: ``threshold`` of the
    shares, at least 2, below the number of shares when there are more than 2.
    """
    shares = nodes
    needed = max(round(threshold * shares), 2)
    return shares, min(needed, shares)


class _Proxy:
    """What the workflow reads of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Strategy:
    """A legacy strategy's two calls the workflow makes: hand out the kit's instructions, take the sum."""

    def __init__(self, node_ids: Sequence[int], fitins: FitIns) -> None:
        self.node_ids = list(node_ids)
        self.fitins = fitins
        self.aggregate: Parameters | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, FitIns]]:
        return [(_Proxy(n), self.fitins) for n in self.node_ids]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        # The workflow put the unmasked weighted mean into every result's parameters.
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}


class _Nodes:
    def __init__(self, count: int) -> None:
        self.count = count

    def num_available(self) -> int:
        return self.count


class _NoHistory:
    def add_metrics_distributed_fit(self, server_round: int, metrics: dict[str, Any]) -> None:
        return None


@dataclass
class _Context:
    """The parts of a LegacyContext that SecAggPlusWorkflow's stages read."""

    state: RecordDict
    strategy: _Strategy
    client_manager: _Nodes
    history: _NoHistory


class _Grid:
    """The workflow's ``send_and_receive``, through the kit's quick exchange, each stage recorded."""

    def __init__(self, send: Send, timeout: float) -> None:
        self.send = send
        self.timeout = timeout
        self.exchanges: list[Exchange] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent = list(messages)
        replies = self.send(sent, self.timeout if timeout is None else timeout)
        self.exchanges.append(Exchange(STAGES[len(self.exchanges)], sent, replies))
        return replies


def secure_round(
    send: Send, node_ids: Sequence[int], arrays: ArrayRecord, *, config: ConfigRecord, server_round: int,
    settings: RunSettings,
) -> SecureRound:  # fmt: skip
    """One round of SecAgg+ over ``node_ids``: the global model plus the unmasked mean of the sites' changes."""
    names = list(arrays.keys())
    global_nd = [arrays[name].numpy() for name in names]
    settings_in: dict[str, Any] = {**config, "server-round": server_round}
    fitins = FitIns(ndarrays_to_parameters(global_nd), settings_in)
    strategy = _Strategy(node_ids, fitins)
    context = _Context(
        RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                    MAIN_PARAMS_RECORD: ArrayRecord()}),
        strategy, _Nodes(len(node_ids)), _NoHistory(),
    )  # fmt: skip
    shares, threshold = protocol_sizes(len(node_ids), settings.secagg_threshold)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every site: Flower computes `nodes` shares, odd where it matters
        reconstruction_threshold=threshold / shares,
        clipping_range=settings.secagg_clipping_range,
        timeout=settings.round_timeout_s,
    )
    grid = _Grid(send, settings.round_timeout_s)
    state = WorkflowState()
    legacy = cast(LegacyContext, context)
    wire = cast(Grid, grid)
    out = SecureRound(None, grid.exchanges)
    for index, stage in enumerate((workflow.setup_stage, workflow.share_keys_stage,
                                   workflow.collect_masked_vectors_stage, workflow.unmask_stage)):  # fmt: skip
        if index == 2:  # the sites announced their example counts at setup: one max_weight for all
            _set_max_weight(state, grid.exchanges[0].replies)
        if not stage(wire, legacy, state):
            got = len(state.active_node_ids)
            out.halted = (f"secure aggregation stopped at its {STAGES[index]} stage: {got} site(s) took part, "
                          f"{threshold} are needed to unmask")  # fmt: skip
            return out
        if index == 2:
            out.received = {r.metadata.src_node_id: masked_digest(r) for r in grid.exchanges[2].replies
                            if not r.has_error()}  # fmt: skip
    if strategy.aggregate is None:
        out.halted = "secure aggregation ended without a sum (no site sent a masked update)"
        return out
    change = parameters_to_ndarrays(strategy.aggregate)
    updated = {}
    for name, old, delta in zip(names, global_nd, change, strict=True):
        new = old.astype(np.float64) + delta.reshape(old.shape)
        updated[name] = Array(np.rint(new).astype(old.dtype) if old.dtype.kind in "iub" else new.astype(old.dtype))
    out.arrays = ArrayRecord(updated)
    return out


def _set_max_weight(state: WorkflowState, setup_replies: list[Message]) -> None:
    """The largest example count any site announced (Flower's default 1000 if none did), into every
    site's train instructions: each site's weight / max_weight is then at most 1, as SecAgg+ needs."""
    counts = []
    for reply in setup_replies:
        if not reply.has_error():
            value = reply.content.config_records[RECORD_KEY_CONFIGS].get(EXAMPLES_KEY)
            if isinstance(value, int) and value > 0:
                counts.append(value)
    max_weight = float(max(counts, default=1000))
    for content in state.nid_to_fitins.values():
        content.config_records[TRAIN_CONFIG][MAX_WEIGHT_KEY] = max_weight


def inspect_round(result: SecureRound, server_round: int, folder: str) -> Path | None:
    """With the run setting ``secagg_inspect = DIR`` (a check for auditors and tests), everything the
    ServerApp received of the sites' updates in this round, into DIR: each masked vector (``.npz``) and,
    for every reply of every stage, the arrays it carried (``received.jsonl``; none under SecAgg+)."""
    if not folder:
        return None
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "received.jsonl").open("a", encoding="utf-8") as lines:
        for part in result.exchanges:
            for reply in part.replies:
                if reply.has_error():
                    continue
                arrays = {name: sum(len(a.data) for a in record.values())
                          for name, record in reply.content.array_records.items()}  # fmt: skip
                lines.write(json.dumps({"round": server_round, "stage": part.stage,
                                        "node": reply.metadata.src_node_id, "array_bytes": arrays}) + "\n")  # fmt: skip
                configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
                if part.stage == STAGES[2] and configs is not None:
                    vectors = cast(list[bytes], configs.get(Key.MASKED_PARAMETERS, []))
                    np.savez(out / f"round-{server_round}-node-{reply.metadata.src_node_id}.npz",
                             *[bytes_to_ndarray(v) for v in vectors])  # fmt: skip
    return out
