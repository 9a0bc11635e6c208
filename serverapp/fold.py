"""A round's updates folded into a running weighted sum as each reply arrives (coordinator memory).

Flower's strategies aggregate a round from all its replies held at once: 8 sites with a 100 MB model
keep 800 MB of updates in the ServerApp. For the strategies whose aggregate is the weighted mean of
the updates (FedAvg, FedProx, FedAdam: Flower's ``aggregate_arrayrecords`` before its server step),
:class:`Fold` screens each reply as the exchange pulls it (:func:`flowerbed.serverapp.validate.update_problem`),
adds ``num-examples x update`` to one sum per tensor and lets the reply's arrays go; the reply keeps its
metric and config records. At the end of the round the strategy aggregates one reply that holds the
mean and the replies' weighted metrics, which gives what it would have made of them all.

FedMedian needs every update at once, and client-level DP clips each update against the model before
the sum: both hold a round's updates (:func:`folds` says which runs fold, :func:`held_why` why not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flowerbed import wire
from flowerbed.config import RunSettings
from flowerbed.serverapp.validate import Spec, blocks, update_problem

ARRAYS = "arrays"  # the record Flower's strategies put the model in
METRICS = "metrics"  # the ClientApp's metric record (num-examples and the training metrics)
WEIGHT = "num-examples"  # Flower's weighted_by_key
FOLDED = ("fedavg", "fedprox", "fedadam")  # a weighted mean of the updates (FedAdam: before its server step)


def held_why(settings: RunSettings) -> str | None:
    """Why this run's rounds hold every update at once (None: they are folded as they arrive)."""
    if settings.secure_aggregation != "off":
        return None  # masked or encrypted: aggregated by their own exchange, never as plain updates
    if settings.dp == "client":
        return "client-level DP clips each update against the model before the sum"
    if settings.strategy not in FOLDED:
        return f"strategy {settings.strategy} needs every update of a round at once"
    return None


def folds(settings: RunSettings) -> bool:
    """Whether this run's plain rounds fold each update into a running sum as it arrives."""
    return settings.secure_aggregation == "off" and held_why(settings) is None


@dataclass
class Fold:
    """One round's running sum. ``expected``: the model as built (its names, shapes and dtypes);
    ``current``: the global model sent."""

    expected: Spec
    current: ArrayRecord
    max_update_norm: float | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # reply message id -> why it was not folded

    def take(self, reply: Message) -> Message:
        """Screen ``reply`` and add its update to the sum; its arrays are let go (its records kept)."""
        if reply.has_error():
            return reply  # the round names it
        problem = update_problem(reply, self.expected, self.max_update_norm, self.current)
        if problem is not None:  # dropped by the round's screen, with this line
            self.problems[reply.metadata.message_id] = problem
        else:
            weight = float(reply.content.metric_records[METRICS][WEIGHT])  # type: ignore[arg-type]
            for name, array in reply.content.array_records[ARRAYS].items():
                value = wire.view(array)  # where it lies in the reply: added a block at a time, never copied whole
                if name not in self.sums:  # float64 for integer buffers (as Flower's weighted mean makes them); an
                    # array of its own in C order (a 0-d one too), which the blocks below add to in place
                    self.sums[name] = np.empty(value.shape, dtype=np.result_type(value, weight))
                    np.multiply(value, weight, out=self.sums[name])
                    continue
                for total, part in zip(blocks(self.sums[name]), blocks(value), strict=True):
                    total += part * weight
            self.weight += weight
            self.count += 1
        reply.content = RecordDict({k: v for k, v in reply.content.items() if k != ARRAYS})
        return reply

    def problem(self, reply: Message) -> str | None:
        """Why ``reply``'s update was not folded (None: it was, or it carried none)."""
        return self.problems.get(reply.metadata.message_id)

    def mean(self) -> ArrayRecord:
        """The weighted mean of the folded updates, in the model's tensor order. The sums are used up: each is
        divided in place (a floating-point sum) and let go once its tensor of the mean is made."""
        mean = ArrayRecord()
        for name in list(self.sums):
            total = self.sums.pop(name)
            if total.dtype.kind == "f":
                total /= self.weight
            else:
                total = total / self.weight
            mean[name] = Array(np.asarray(total))
            del total
        return mean

    def aggregate(self, strategy: Any, server_round: int, valid: list[Message]) -> tuple[Any, Any]:
        """The strategy's aggregate of the round, from one reply holding the mean and the valid replies'
        metrics as the strategy weights them (its ``train_metrics_aggr_fn``), their total examples its weight.
        That reply is the first valid one with this content for the call (a strategy reads only content
        and error), its own content put back after."""
        metrics = strategy.train_metrics_aggr_fn([reply.content for reply in valid], WEIGHT)
        record = MetricRecord({**dict(metrics.items()), WEIGHT: self.weight})
        self.current = ArrayRecord()  # the model sent is not held on through the next round (the loop keeps this)
        if type(strategy).aggregate_train is FedAvg.aggregate_train:  # FedAvg, FedProx: their aggregate of one
            # reply of weight 1 is its arrays times 1.0, made as a second copy of the model: the mean itself instead
            return self.mean(), strategy.train_metrics_aggr_fn([RecordDict({METRICS: record})], WEIGHT)
        lead = valid[0]
        kept = lead.content
        lead.content = RecordDict({ARRAYS: self.mean(), METRICS: record})
        try:
            return strategy.aggregate_train(server_round, [lead])  # type: ignore[no-any-return]
        finally:
            lead.content = kept
