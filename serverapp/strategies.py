"""Build the Flower strategy named in the run settings."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from flowerbed.config import RunSettings


def make_strategy(settings: RunSettings) -> Strategy:
    """FedAvg, FedProx, FedAdam or FedMedian; every one samples all connected nodes."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": settings.min_nodes,
        "min_evaluate_nodes": settings.min_nodes,
        "min_available_nodes": settings.min_nodes,
    }
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if settings.strategy == "fedadam":
        return FedAdam(eta=settings.server_learning_rate, eta_l=settings.learning_rate, **common)
    if settings.strategy == "fedmedian":
        return FedMedian(**common)
    return FedAvg(**common)
