"""Checks on each site's update before it reaches the model, and on the model after aggregation.

A site's reply is aggregated only when its arrays have exactly the global model's tensor names,
shapes and dtypes, every value is finite, it reports a positive example count and, when the run
sets ``max_update_norm``, the L2 norm of its change to the global model is within it. A reply that
fails is dropped from that round with one line naming the site and the reason, and counts as that
site's failure for min-nodes. Pure functions on Flower's records: tested alone and in real runs.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

NON_FINITE = "model-not-finite"  # the stop reason of a run whose aggregated model is not finite


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def update_problem(
    reply: Message, expected: ArrayRecord, max_update_norm: float | None = None, current: ArrayRecord | None = None
) -> str | None:
    """Why ``reply``'s update may not be aggregated; None: it may.

    ``expected``: the task's model as built (names, shapes and dtypes: an aggregated integer buffer
    such as BatchNorm's batch count comes back as float, the sites' stays integer); ``current``: the
    global model sent this round, which ``max_update_norm`` measures the change from (default: ``expected``).
    """
    records = reply.content.array_records
    if "arrays" not in records:
        return "its reply has no model update"
    metrics = reply.content.metric_records.get("metrics")
    count = metrics.get("num-examples") if metrics is not None else None
    if not isinstance(count, int | float) or not math.isfinite(count) or count <= 0:
        return f"it reports {count if count is not None else 'no'} training examples (must be > 0)"
    got, want = _arrays(records["arrays"]), _arrays(expected)
    sent = _arrays(current) if current is not None and max_update_norm is not None else want
    if list(got) != list(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        parts = ([f"lacks {', '.join(missing[:3])}"] if missing else []) + (
            [f"has unknown {', '.join(extra[:3])}"] if extra else []
        )
        return "update tensors differ from the model's: " + ("; ".join(parts) or "another order")
    bad = 0
    squared = 0.0
    for name, array in got.items():
        if array.shape != want[name].shape:
            return f"update tensor {name} has shape {list(array.shape)}, the model's is {list(want[name].shape)}"
        if array.dtype != want[name].dtype:
            return f"update tensor {name} is {array.dtype}, the model's is {want[name].dtype}"
        if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
            finite = np.isfinite(array)
            bad += int(array.size - np.count_nonzero(finite))
            if max_update_norm is not None and not bad:
                squared += float(np.sum((array.astype(np.float64) - sent[name].astype(np.float64)) ** 2))
    if bad:
        return f"update has {bad:,} non-finite (NaN or infinite) values"
    if max_update_norm is not None and math.sqrt(squared) > max_update_norm:
        return f"update norm {math.sqrt(squared):.4g} exceeds max_update_norm {max_update_norm:g}"
    return None


def non_finite_values(record: ArrayRecord) -> int:
    """How many values of a model are NaN or infinite."""
    return sum(
        int(a.size - np.count_nonzero(np.isfinite(a)))
        for a in _arrays(record).values()
        if np.issubdtype(a.dtype, np.floating)
    )
