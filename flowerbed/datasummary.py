"""What a task's ``load_data`` loaded, summed up, and what in it would spoil a run (``flowerbed task check``).

A task's data sets are any torch ``Dataset`` of ``(features, label)`` pairs; the summary reads every
item once: rows, features per row, class counts, non-finite values, the label range against the
model's outputs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataSummary:
    """One split of a site's data as the task loaded it."""

    split: str
    rows: int = 0
    features: int | None = None  # values per row (all of them, flattened)
    classes: Counter[int] = field(default_factory=Counter)
    non_finite: int = 0  # NaN or infinite feature values
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    labels_not_int: int = 0

    @property
    def label_range(self) -> str:
        """``min..max`` of the labels (``-`` without any)."""
        return f"{min(self.classes)}..{max(self.classes)}" if self.classes else "-"


def summarize(split: str, data: Any, limit: int = 200_000) -> DataSummary:
    """The summary of a ``Dataset`` of ``(features, label)`` pairs (at most ``limit`` rows are read)."""
    import torch

    summary = DataSummary(split)
    for index in range(min(len(data), limit)):
        item = data[index]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"{split} item {index} is not a (features, label) pair: {type(item).__name__}")
        x, y = item
        tensor = torch.as_tensor(x).float()
        summary.rows += 1
        summary.shapes.add(tuple(tensor.shape))
        summary.features = tensor.numel()
        summary.non_finite += int((~torch.isfinite(tensor)).sum())
        label = torch.as_tensor(y)
        value = float(label.reshape(-1)[0]) if label.numel() else math.nan
        if not math.isfinite(value) or value != int(value):
            summary.labels_not_int += 1
            continue
        summary.classes[int(value)] += 1
    return summary


def problems(summaries: list[DataSummary], outputs: int | None) -> list[str]:
    """What would spoil a run, one line each: labels outside the model's classes, a single class,
    non-finite features, rows of different shapes, labels that are not whole numbers."""
    found = []
    for s in summaries:
        if s.rows == 0:
            found.append(f"{s.split}: no rows")
            continue
        if outputs is not None and s.classes and (min(s.classes) < 0 or max(s.classes) >= outputs):
            where = f"the model's {outputs} classes 0..{outputs - 1}"
            found.append(f"{s.split}: labels {s.label_range} are outside {where}")
        if len(s.classes) == 1 and s.split == "train":
            only = next(iter(s.classes))
            found.append(f"{s.split}: a single class ({only}): the model cannot learn to tell classes apart")
        if s.non_finite:
            found.append(f"{s.split}: {s.non_finite} NaN or infinite feature value(s): fill or drop them in load_data")
        if len(s.shapes) > 1:
            found.append(f"{s.split}: rows of different shapes {sorted(s.shapes)[:3]}")
        if s.labels_not_int:
            found.append(f"{s.split}: {s.labels_not_int} label(s) are not whole numbers (NaN, or a fraction)")
    return found


def class_counts(data: Any, limit: int = 2000) -> dict[int, int] | None:
    """The count of each label in a data set of ``(features, label)`` pairs, read cheaply: a TensorDataset
    (or a Subset or ConcatDataset of them) from its label tensor, another data set item by item when it
    has at most ``limit`` items. None: not counted (larger, or labels that are not whole numbers)."""
    import torch

    labels = _labels(data)
    if labels is None:
        if len(data) > limit:
            return None
        try:
            labels = torch.stack([torch.as_tensor(data[i][1]).reshape(-1)[0] for i in range(len(data))])
        except (IndexError, TypeError, ValueError, RuntimeError):
            return None
    if labels.numel() == 0 or (labels.is_floating_point() and not bool((labels == labels.round()).all())):
        return None
    values, counts = torch.unique(labels.long(), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def _labels(data: Any) -> Any:
    """The label tensor behind a TensorDataset, a Subset or a ConcatDataset of them (None: another kind)."""
    import torch
    from torch.utils.data import ConcatDataset, Subset, TensorDataset

    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return data.tensors[1].reshape(len(data), -1)[:, 0]
    if isinstance(data, Subset):
        inner = _labels(data.dataset)
        return inner[torch.as_tensor(list(data.indices), dtype=torch.long)] if inner is not None else None
    if isinstance(data, ConcatDataset):
        parts = [_labels(d) for d in data.datasets]
        return torch.cat(parts) if parts and all(p is not None for p in parts) else None
    return None
