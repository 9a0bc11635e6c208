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
from flowerbed.serverapp.history import FINAL_EVAL, History, RoundRow

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


class SiteNames:
    """Which site each node id is, so that every message about a node names its site.

    A site's ClientApp puts its ``site-name`` (from the SuperNode's node config) into each reply;
    an error reply that Flower itself made (e.g. Node Unavailable) comes from the SuperLink, so the
    node is found through the message it answers.
    """

    def __init__(self) -> None:
        self.by_node: dict[int, str] = {}

    def learn(self, node_id: int, reply: Message) -> None:
        if reply.has_error():
            return
        for record in reply.content.config_records.values():
            site = record.get("site-name")
            if isinstance(site, str) and site:
                self.by_node[node_id] = site

    def names(self, replies: list[Message], messages: list[Message]) -> list[str]:
        """The site names of valid ``replies`` (sorted; unknown nodes by id)."""
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        found = []
        for reply in replies:
            node_id = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            found.append(self.by_node.get(node_id, f"node {node_id}"))
        return sorted(found)

    def name(self, node_id: int) -> str:
        site = self.by_node.get(node_id)
        return f"site {site} (node {node_id})" if site else f"node {node_id} (site not known yet)"


def _split(messages: list[Message], replies: list[Message], sites: SiteNames) -> tuple[list[Message], list[str]]:
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    valid, errors = [], []
    for reply in replies:
        node_id = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        sites.learn(node_id, reply)
        if reply.has_error():
            reason = str(reply.error.reason)
            who = sites.name(node_id)
            # Our ClientApp's own errors already start with "site NAME:"; Flower's do not.
            errors.append(reason if reason.startswith("site ") else f"{who}: {reason}")
        else:
            valid.append(reply)
    answered = {dst.get(r.metadata.reply_to_message_id) for r in replies}
    errors.extend(
        f"{sites.name(node)}: no reply before round-timeout-s" for node in dst.values() if node not in answered
    )
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
    sites = SiteNames()
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
        valid, errors = _split(messages, replies, sites)
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
                sites=sites.names(valid, messages),
            )
        )
        history.checkpoint(server_round, arrays.to_torch_state_dict())
    final = arrays
    best_loss = best_acc = None
    if reason in (MAX_ROUNDS, TIME_BUDGET):
        t0 = clock()
        final_eval, valid_n, errors = evaluate_final(grid, strategy, arrays, settings, server_round + 1, sites=sites)
        history.append(
            RoundRow(
                round=server_round + 1, nodes=valid_n, failures=len(errors), train_loss=None,
                eval_loss=final_eval[0] if final_eval else None,
                eval_accuracy=final_eval[1] if final_eval else None,
                seconds=round(clock() - t0, 2),
                stop_reason="evaluation of the last model" if final_eval else "final evaluation: too few replies",
                errors=errors, kind=FINAL_EVAL,
            )
        )  # fmt: skip
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
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    settings: RunSettings,
    server_round: int,
    *,
    sites: SiteNames,
) -> tuple[tuple[float, float] | None, int, list[str]]:
    """One evaluate exchange for the last aggregated model (it was never evaluated).

    Returns (loss, accuracy) or None, the number of valid replies, and the errors naming sites.
    """
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout_s))
    valid, errors = _split(messages, replies, sites)
    if len(valid) < settings.min_nodes:
        return None, len(valid), errors
    metrics = strategy.aggregate_evaluate(server_round, replies)
    loss, acc = _metric(metrics, "eval-loss"), _metric(metrics, "eval-accuracy")
    if loss is None or acc is None:
        return None, len(valid), errors
    return (loss, acc), len(valid), errors
