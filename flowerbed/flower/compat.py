"""Helpers from Flower's internal modules that the kit calls, each checked when first used.

- ``secaggplus_mod`` (``flwr.client.mod``): the site's half of SecAgg+.
- ``fitres_to_recorddict`` (``flwr.compat``): a masked update in the record layout SecAgg+ reads.
- ``aggregate_metricrecords`` (``flwr.serverapp.strategy.strategy_utils``): the weighted mean of metrics.
- ``log`` (``flwr.supercore``): a line in Flower's own ServerApp log.
- ``build_fab_from_disk`` (``flwr.cli.build``): a FAB built exactly as ``flwr build`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowerbed.flower import declare, resolve, trace

SECAGG_MOD = declare("flwr.client.mod", "secaggplus_mod", "mask updates for secure aggregation", path=False)
FITRES = declare(
    "flwr.compat.common.recorddict_compat", "fitres_to_recorddict", "mask updates for secure aggregation",
    "fitres", "keep_input", path=False,
)  # fmt: skip
AGGREGATE_METRICS = declare(
    "flwr.serverapp.strategy.strategy_utils",
    "aggregate_metricrecords",
    "average the sites' metrics",
    "records",
    "weighting_metric_name",
    path=False,
)  # fmt: skip  (a secure round's metrics: the plain rounds' strategy averages them itself)
FLOWER_LOG = declare("flwr.supercore", "log", "write to the ServerApp's log")
BUILD_FAB = declare("flwr.cli.build", "build_fab_from_disk", "build a Flower App's FAB", path=False)


def secaggplus_mod(message: Any, context: Any, call_next: Any) -> Any:
    """Flower's ``secaggplus_mod`` around ``call_next`` (the site's train handler)."""
    trace(SECAGG_MOD)
    return resolve(SECAGG_MOD)(message, context, call_next)


def fitres_to_recorddict(fitres: Any, keep_input: bool) -> Any:
    """Flower's legacy ``FitRes`` as a ``RecordDict`` (the layout SecAgg+'s stages read)."""
    trace(FITRES)
    return resolve(FITRES)(fitres, keep_input=keep_input)


def aggregate_metricrecords(records: list[Any], weighting_metric_name: str) -> Any:
    """Flower's weighted mean of the sites' ``MetricRecord``s (weights: ``weighting_metric_name``)."""
    trace(AGGREGATE_METRICS)
    return resolve(AGGREGATE_METRICS)(records, weighting_metric_name)


def log(level: int, message: str, *args: Any) -> None:
    """A line in Flower's own log (the ServerApp's log that ``flwr log`` shows)."""
    trace(FLOWER_LOG)
    resolve(FLOWER_LOG)(level, message, *args)


def build_fab(app_dir: Path) -> Any:
    """``flwr build``'s FAB of ``app_dir`` (its bytes and hash, as Flower returns them)."""
    trace(BUILD_FAB)
    return resolve(BUILD_FAB)(app_dir)
