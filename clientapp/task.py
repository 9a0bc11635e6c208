"""Pure PyTorch: the models, local training (with an optional FedProx term) and evaluation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flowerbed.clientapp.device import task_device
from flowerbed.scaling import FeatureScaling

if TYPE_CHECKING:
    from flowerbed.clientapp.privacy import PrivateTraining


def make_model(
    kind: str,
    *,
    num_features: int,
    num_classes: int,
    hidden_units: int,
    image_size: int,
    channels: int = 3,
    scaling: bool = False,
) -> nn.Module:
    """``mlp`` for tabular CSV data or small images (flattened to ``num_features`` values), ``cnn`` for
    images (``channels`` x image_size x image_size). ``scaling``: the MLP standardizes its features
    first (:class:`flowerbed.scaling.FeatureScaling`, filled from all sites' statistics)."""
    if kind == "mlp":
        first: list[nn.Module] = [FeatureScaling(num_features)] if scaling else []
        return nn.Sequential(
            nn.Flatten(),
            *first,
            nn.Linear(num_features, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, num_classes),
        )
    if kind == "cnn":
        side = image_size // 4
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * side * side, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, num_classes),
        )
    raise ValueError(f"unknown model {kind!r}: use 'mlp' or 'cnn'")


def device() -> torch.device:
    """The site's ``device`` (site.toml): the GPU when ``auto`` and torch sees one, else the CPU."""
    return task_device()


@dataclass(frozen=True)
class EvalResult:
    """A model's loss and accuracy on one data set."""

    loss: float
    accuracy: float
    num_examples: int


def train(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    seed: int = 0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    private: PrivateTraining | None = None,
) -> float:
    """Train in place with Adam (or SGD with ``momentum``); returns the mean training loss of the last epoch.

    With ``proximal_mu > 0`` the FedProx term mu/2 * ||w - w_global||^2 keeps the local model
    near the global one it started from. With ``private``, DP-SGD (Opacus): per-example clipping and
    noise, Poisson-sampled batches; the FedProx term is left out there (it is not per example).
    """
    dev = device()
    model.to(dev)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    step: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=learning_rate)
    )
    criterion = nn.CrossEntropyLoss()
    global_params = [p.detach().clone() for p in model.parameters()]
    forward: nn.Module = model
    if private is not None:
        forward, step, loader = private.make_private(model, step, loader, epochs)
        proximal_mu = 0.0
        # Opacus's per-example hooks fire on the first layer although the input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch
                continue
            xb, yb = xb.to(dev), yb.to(dev)
            step.zero_grad()
            loss = criterion(forward(xb), yb)
            if proximal_mu > 0:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
                loss = loss + (proximal_mu / 2) * prox
            loss.backward()
            step.step()
            total += float(loss.item()) * len(yb)
            count += len(yb)
        last = total / max(count, 1)
    if private is not None:
        private.release(forward)
    return last


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 256) -> EvalResult:
    """Cross-entropy loss and accuracy on ``data``."""
    dev = device()
    model.to(dev)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total, correct, count = 0.0, 0, 0
    for xb, yb in DataLoader(data, batch_size=batch_size):
        xb, yb = xb.to(dev), yb.to(dev)
        out = model(xb)
        total += float(criterion(out, yb).item())
        correct += int((out.argmax(dim=1) == yb).sum().item())
        count += len(yb)
    if count == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    return EvalResult(loss=total / count, accuracy=correct / count, num_examples=count)
