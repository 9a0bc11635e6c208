"""The federated loop: train rounds until a convergence criterion, failing loudly on too few replies."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flowerbed.config import RunSettings
from flowerbed.serverapp.criteria import MAX_ROUNDS, TIME_BUDGET, ConvergenceTracker
from flowerbed.serverapp.history import History, RoundRow

Clock = Callable[[], float]


class RunFailedError(Exception):
    """The run cannot go on (too few valid replies, nodes never connected)."""


@dataclass
class Outcome:
    """How a run ended."""

    stop_reason: str
    rounds: int
    best_round: int | None
    best_eval_loss: float | None
    best_eval_accuracy: float | None
    final_arrays: ArrayRecord


def wait_for_nodes(grid: Grid, settings: RunSettings, clock: Clock = time.monotonic) -> int:
    """Wait until ``min_nodes`` SuperNodes are connected, at most ``node_wait_s``."""
    end = clock() + settings.node_wait_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= settings.min_nodes:
            return connected
        if clock() >= end:
            raise RunFailedError(
                f"only {connected} of min-nodes={settings.min_nodes} SuperNodes connected within "
                f"{settings.node_wait_s:.0f} s: check that the sites run `flowerbed supernode start`"
            )
        time.sleep(1)


def _split(replies: list[Message]) -> tuple[list[Message], list[str]]:
    valid, errors = [], []
    for reply in replies:
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        else:
            valid.append(reply)
    return valid, errors


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    initial: ArrayRecord,
    settings: RunSettings,
    history: History,
    *,
    clock: Clock = time.monotonic,
) -> Outcome:
    """Train until target/plateau/max-rounds/time-budget; raise :class:`RunFailedError` on too few replies."""
    tracker = ConvergenceTracker(settings)
    start = clock()
    arrays = initial
    sent: dict[int, ArrayRecord] = {}
    server_round = 0
    reason: str | None = None
    while reason is None:
        server_round += 1
        t0 = clock()
        wait_for_nodes(grid, settings, clock)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout_s))
        valid, errors = _split(replies)
        if len(valid) < settings.min_nodes:
            why = f"round {server_round}: {len(valid)} valid replies, min-nodes is {settings.min_nodes}" + (
                f" ({'; '.join(errors)})" if errors else " (no reply before round-timeout-s)"
            )
            history.append(
                RoundRow(server_round, len(valid), len(errors), None, None, None,
                         round(clock() - t0, 2), f"failed: {why}", errors)
            )  # fmt: skip
            raise RunFailedError(why)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        sent[server_round] = arrays
        eval_loss = _metric(metrics, "eval-loss")
        eval_acc = _metric(metrics, "eval-accuracy")
        if eval_loss is not None and eval_acc is not None:
            reason = tracker.observe(server_round, eval_loss, eval_acc)
        if new_arrays is not None:
            arrays = new_arrays
        if reason is None:
            reason = tracker.limit(server_round, clock() - start, settings)
        history.append(
            RoundRow(
                round=server_round,
                nodes=len(valid),
                failures=len(errors),
                train_loss=_metric(metrics, "train-loss"),
                eval_loss=eval_loss,
                eval_accuracy=eval_acc,
                seconds=round(clock() - t0, 2),
                stop_reason=reason or "",
                errors=errors,
            )
        )
        history.checkpoint(server_round, arrays.to_torch_state_dict())
    final = arrays
    best_loss = best_acc = None
    if reason in (MAX_ROUNDS, TIME_BUDGET):
        final_eval = evaluate_final(grid, strategy, arrays, settings, server_round + 1)
        if final_eval is not None:
            tracker.observe(server_round + 1, *final_eval)
            sent[server_round + 1] = arrays
    if tracker.best_round is not None:
        final = sent[tracker.best_round]
        for rnd, loss, acc in tracker.history:
            if rnd == tracker.best_round:
                best_loss, best_acc = loss, acc
    return Outcome(reason, server_round, tracker.best_round, best_loss, best_acc, final)


def evaluate_final(
    grid: Grid, strategy: Strategy, arrays: ArrayRecord, settings: RunSettings, server_round: int
) -> tuple[float, float] | None:
    """One evaluate exchange for the last aggregated model (it was never evaluated)."""
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout_s))
    valid, _ = _split(replies)
    if len(valid) < settings.min_nodes:
        return None
    metrics = strategy.aggregate_evaluate(server_round, replies)
    loss, acc = _metric(metrics, "eval-loss"), _metric(metrics, "eval-accuracy")
    if loss is None or acc is None:
        return None
    return loss, acc
