"""Checks on each site's update before it reaches the model, and on the model after aggregation.

A site's reply is aggregated only when its arrays have exactly the global model's tensor names,
shapes and dtypes, every value is finite, it reports a positive example count and, when the run
sets ``max_update_norm``, the L2 norm of its change to the global model is within it. A reply that
fails is dropped from that round with one line naming the site and the reason, and counts as that
site's failure for min-nodes. Pure functions on Flower's records: tested alone and in real runs.

Memory: a check reads each tensor where it lies in the reply (:func:`flowerbed.wire.view`, no copy) and
a block of it at a time, and the model's own names, shapes and dtypes are a :data:`Spec`, not a second
copy of its values: checking an update of a 100 MB model costs a few MB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from flwr.app import ArrayRecord, Message

from flowerbed import wire

NON_FINITE = "model-not-finite"  # the stop reason of a run whose aggregated model is not finite
Spec = dict[str, tuple[tuple[int, ...], str]]  # a model's tensor names -> (shape, dtype): what an update must match
BLOCK = 1 << 18  # values per step of a check or a sum: its temporaries stay at 2 MB, whatever the tensor


def spec_of(record: ArrayRecord) -> Spec:
    """The names, shapes and dtypes of a model's tensors, from Flower's metadata (no value is read)."""
    return {name: (tuple(array.shape), str(array.dtype)) for name, array in record.items()}


def _tensors(record: ArrayRecord) -> Iterator[tuple[str, np.ndarray]]:
    """A record's tensors one at a time, each a read-only view of its bytes in the record."""
    for name, array in record.items():
        yield name, wire.view(array)


def blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s values in C order, BLOCK at a time: views into it where it is C-contiguous (a block
    written to is written to ``array``), else into a C-ordered copy."""
    flat = np.ascontiguousarray(array).reshape(-1)
    for at in range(0, flat.size, BLOCK):
        yield flat[at : at + BLOCK]


def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """sum((a - b)^2) in float64, a block at a time."""
    total = 0.0
    for x, y in zip(blocks(a), blocks(b), strict=True):
        d = np.subtract(x, y, dtype=np.float64)
        total += float(np.dot(d, d))
    return total


def _non_finite(array: np.ndarray) -> int:
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
        return 0
    return sum(int(block.size - np.count_nonzero(np.isfinite(block))) for block in blocks(array))


def update_problem(
    reply: Message,
    expected: Spec | ArrayRecord,
    max_update_norm: float | None = None,
    current: ArrayRecord | None = None,
) -> str | None:
    """Why ``reply``'s update may not be aggregated; None: it may.

    ``expected``: the task's model as built, or its :data:`Spec` (names, shapes and dtypes: an aggregated
    integer buffer such as BatchNorm's batch count comes back as float, the sites' stays integer);
    ``current``: the global model sent this round, which ``max_update_norm`` measures the change from
    (default: ``expected``, which must then be the model itself).
    """
    records = reply.content.array_records
    if "arrays" not in records:
        return "its reply has no model update"
    metrics = reply.content.metric_records.get("metrics")
    count = metrics.get("num-examples") if metrics is not None else None
    if not isinstance(count, int | float) or not math.isfinite(count) or count <= 0:
        return f"it reports {count if count is not None else 'no'} training examples (must be > 0)"
    want = expected if isinstance(expected, dict) else spec_of(expected)
    update = records["arrays"]
    if list(update) != list(want):
        missing, extra = sorted(set(want) - set(update)), sorted(set(update) - set(want))
        parts = ([f"lacks {', '.join(missing[:3])}"] if missing else []) + (
            [f"has unknown {', '.join(extra[:3])}"] if extra else []
        )
        return "update tensors differ from the model's: " + ("; ".join(parts) or "another order")
    sent = current if current is not None else expected
    base = sent if isinstance(sent, ArrayRecord) else None
    if max_update_norm is not None and base is None:
        raise TypeError("max_update_norm needs the model sent (current), not only its spec")
    bad = 0
    squared = 0.0
    for name in want:
        try:
            array = wire.view(update[name])
        except (TypeError, ValueError) as exc:  # not numpy's bytes, or torn
            return f"update tensor {name} cannot be read ({exc})"
        shape, dtype = want[name]
        if array.shape != shape:
            return f"update tensor {name} has shape {list(array.shape)}, the model's is {list(shape)}"
        if str(array.dtype) != dtype:
            return f"update tensor {name} is {array.dtype}, the model's is {dtype}"
        bad += _non_finite(array)
        if base is not None and max_update_norm is not None and not bad and array.dtype.kind == "f":
            squared += _squared_distance(array, wire.view(base[name]))
        del array  # the next tensor is read in its place
    if bad:
        return f"update has {bad:,} non-finite (NaN or infinite) values"
    if max_update_norm is not None and math.sqrt(squared) > max_update_norm:
        return f"update norm {math.sqrt(squared):.4g} exceeds max_update_norm {max_update_norm:g}"
    return None


def non_finite_values(record: ArrayRecord) -> int:
    """How many values of a model are NaN or infinite (one tensor read at a time)."""
    return sum(_non_finite(array) for _, array in _tensors(record))
