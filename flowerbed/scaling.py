"""Federated feature standardization: a model layer whose mean and standard deviation come from all sites.

:class:`FeatureScaling` is the first layer of the built-in tabular model (and of an own task's model
that adds it): ``(x - mean) / std`` with both as buffers, so the scaling travels with the model, is
the same at every site and is saved in ``final_model.pt``. Before round 1 the ServerApp asks each
site once for its training split's per-feature count, sum and sum of squares (:func:`feature_sums`,
nothing else leaves the site), adds them up (:func:`combine`) and fills the layer
(:func:`fill_scaling`). A model trained on one data set alone (a local-only baseline, ``task check``)
takes that set's own statistics (:func:`fit_scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MIN_STD = 1e-6  # a feature constant over all sites is left unscaled (divided by 1), not blown up


class FeatureScaling(nn.Module):
    """``(x - mean) / std`` per feature; identity until filled (mean 0, std 1)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features standardized."""
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class FeatureSums:
    """What one site sends of its training split: the count of rows and per-feature sums and sums of squares."""

    count: int
    sums: list[float]
    squares: list[float]

    def record(self) -> dict[str, Any]:
        """As the site's reply carries it (a ConfigRecord's values)."""
        return {"count": self.count, "sum": self.sums, "sumsq": self.squares}

    @classmethod
    def from_record(cls, record: Any) -> FeatureSums:
        """From a site's reply; a malformed one raises ValueError."""
        count = int(record["count"])
        sums = [float(v) for v in record["sum"]]
        squares = [float(v) for v in record["sumsq"]]
        if count < 0 or len(sums) != len(squares):
            raise ValueError(f"feature sums of {len(sums)} and {len(squares)} features, count {count}")
        return cls(count, sums, squares)


@dataclass(frozen=True)
class Scaling:
    """The global mean and standard deviation of each feature, from ``count`` rows."""

    count: int
    mean: list[float]
    std: list[float]


def scaling_layers(model: Any) -> list[tuple[str, FeatureScaling]]:
    """The model's feature-scaling layers by their state-dict prefix (empty: it standardizes nothing, or
    it is no torch module)."""
    if not isinstance(model, nn.Module):
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FeatureScaling)]


def _features(dataset: Any) -> torch.Tensor:
    """The dataset's inputs as one (rows, features) float64 tensor (a TensorDataset at once, else item by item)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors:
        x: torch.Tensor = tensors[0]
    else:
        rows = [dataset[i][0] for i in range(len(dataset))]
        x = torch.stack([torch.as_tensor(r) for r in rows]) if rows else torch.zeros(0, 0)
    return x.reshape(len(x), -1).to(torch.float64)


def feature_sums(dataset: Any) -> FeatureSums:
    """Count, per-feature sum and sum of squares of a data set's inputs (non-finite values raise)."""
    x = _features(dataset)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the training data has NaN or infinite feature values: clean them before the run")
    return FeatureSums(len(x), x.sum(0).tolist(), (x * x).sum(0).tolist())


def combine(parts: list[FeatureSums]) -> Scaling:
    """The global mean and (population) standard deviation from the sites' sums."""
    if not parts:
        raise ValueError("no site sent feature sums")
    width = {len(p.sums) for p in parts}
    if len(width) != 1:
        raise ValueError(f"sites sent feature sums of different widths: {sorted(width)}")
    count = sum(p.count for p in parts)
    if count == 0:
        raise ValueError("the sites' training splits are empty")
    sums = [sum(values) for values in zip(*(p.sums for p in parts), strict=True)]
    squares = [sum(values) for values in zip(*(p.squares for p in parts), strict=True)]
    mean = [s / count for s in sums]
    std = [math.sqrt(max(q / count - m * m, 0.0)) for q, m in zip(squares, mean, strict=True)]
    return Scaling(count, mean, [s if s > MIN_STD else 1.0 for s in std])


def fill_scaling(model: nn.Module, scaling: Scaling) -> list[str]:
    """Set every feature-scaling layer of ``model`` to ``scaling``; returns the layers' names."""
    names = []
    for name, layer in scaling_layers(model):
        mean = torch.tensor(scaling.mean, dtype=layer.mean.dtype)
        if mean.shape != layer.mean.shape:
            raise ValueError(
                f"the model's feature scaling {name or 'layer'} takes {layer.mean.numel()} features, "
                f"the sites' data has {mean.numel()}: set num_features = {mean.numel()}"
            )
        layer.mean.copy_(mean)
        layer.std.copy_(torch.tensor(scaling.std, dtype=layer.std.dtype))
        names.append(name)
    return names


def fit_scaling(model: nn.Module, dataset: Any) -> None:
    """Fill ``model``'s scaling layers from one data set alone (a model that never leaves it)."""
    if scaling_layers(model) and len(dataset):
        fill_scaling(model, combine([feature_sums(dataset)]))
