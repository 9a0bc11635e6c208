"""Federated feature standardization at the coordinator: one query to every site before round 1.

Each site answers with its training split's per-feature count, sum and sum of squares
(:func:`flowerbed.scaling.feature_sums`); their totals give the global mean and standard deviation,
which go into the model's :class:`~flowerbed.scaling.FeatureScaling` layers (so they travel with
the model to every site and are saved with it), into ``feature_scaling.json`` and into the audit trail.
Under secure aggregation or DP the sites' sums would leave them in the clear: the query is not sent.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from flowerbed.audit import RUN, append_here
from flowerbed.flower import compat
from flowerbed.protocol import FEATURE_STATS_KEY, FEATURE_SUMS
from flowerbed.runfolder import write_feature_scaling
from flowerbed.scaling import FeatureSums, combine, fill_scaling, scaling_layers
from flowerbed.serverapp.loop import (
    Clock,
    Replies,
    RoundState,
    RunFailedError,
    exchange,
    short_round,
    split_replies,
    wait_for_nodes,
)


def skipped_why(state: RoundState) -> str | None:
    """Why the run does not standardize its features (None: it does)."""
    settings = state.settings
    if not settings.standardize_features:
        return "standardize_features = false"
    if settings.secure_aggregation != "off":
        return "secure aggregation is on (each site's feature sums would reach the coordinator in the clear)"
    if settings.dp != "off":
        return f"dp = {settings.dp} (the sites' feature sums are not covered by the privacy budget)"
    return None


def standardize(
    grid: Grid, state: RoundState, clock: Clock, sleep: Callable[[float], None], *, build: Callable[[], nn.Module]
) -> None:
    """Fill the scaling layers of the task's model as built (``build`` makes the model, ``state.arrays`` holds its
    values before round 1) from all sites' sums, and send that model in round 1.

    The query is round 1's first exchange: too few replies wait for absent sites or fail the run as
    round 1 would (:func:`flowerbed.serverapp.loop.short_round`). A site that trains under DP sends
    nothing and the run goes on unstandardized, said in ``feature_scaling.json``.
    """
    out_dir = state.history.out_dir
    model = build()
    model.load_state_dict(state.arrays.to_torch_state_dict())
    layers = [name for name, _ in scaling_layers(model)]
    why = skipped_why(state)
    if why is not None:
        write_feature_scaling(out_dir, {"status": "off", "reason": why, "layers": layers})
        return
    state.server_round = 1  # its failures are round 1's
    try:
        got = _query(grid, state, clock, sleep)
    finally:
        state.server_round = 0
    if got.retired:  # a site that trains only under DP: its statistics would not be covered
        reason = "; ".join(got.retired.values())
        compat.log(WARNING, "feature statistics: %s", reason)
        write_feature_scaling(out_dir, {"status": "off", "reason": reason, "layers": layers})
        return
    parts: dict[str, FeatureSums] = {}
    try:
        for site, reply in zip(got.sites_unsorted, got.valid, strict=True):
            parts[site] = FeatureSums.from_record(reply.content.config_records.get(FEATURE_SUMS))
    except (KeyError, TypeError, ValueError) as exc:
        raise RunFailedError(f"feature statistics before round 1: site {site} sent no valid sums ({exc})") from None
    try:
        scaling = combine(list(parts.values()))
        fill_scaling(model, scaling)  # the sites' width against the layer's ("set num_features = N")
    except ValueError as exc:
        raise RunFailedError(f"feature statistics before round 1: {exc}") from None
    state.arrays = ArrayRecord(model.state_dict())
    examples = {site: part.count for site, part in sorted(parts.items())}
    record = {"status": "standardized", "examples": scaling.count, "sites": examples,
              "features": len(scaling.mean), "layers": layers, "mean": scaling.mean, "std": scaling.std}  # fmt: skip
    write_feature_scaling(out_dir, record)
    append_here(RUN, "serverapp", event="feature scaling", run=out_dir.name, examples=scaling.count, sites=examples,
                mean=scaling.mean, std=scaling.std)  # fmt: skip
    compat.log(INFO, "features standardized with the statistics of %s training examples at %s sites",
               scaling.count, len(parts))  # fmt: skip


def _query(grid: Grid, state: RoundState, clock: Clock, sleep: Callable[[float], None]) -> Replies:
    """Ask every connected site for its sums until ``min_nodes`` answer (or one trains under DP)."""
    settings = state.settings
    while True:
        t0 = clock()
        if not state.sites.by_node:
            wait_for_nodes(grid, settings, clock)
        messages = [Message(content=RecordDict({"config": ConfigRecord({FEATURE_STATS_KEY: 1, "server-round": 1})}),
                            dst_node_id=node, message_type=MessageType.QUERY, group_id="0")
                    for node in grid.get_node_ids()]  # fmt: skip
        dropped: dict[int, str] = {}  # as a round waits: a revoked site dropped at once, a dark one named
        replies = exchange(grid, messages, settings.round_timeout_s, clock, watch=state.dark.watch, dropped=dropped,
                           on_dark=state.dark.noted(1))  # fmt: skip
        got = split_replies(messages, replies, state.sites, dropped)
        state.carried += [line for line in dropped.values() if line not in state.carried]
        if got.retired or len(got.valid) >= settings.min_nodes:
            return got
        short_round(state, got, t0, clock, sleep)  # waits for absent sites, or raises RunFailedError
