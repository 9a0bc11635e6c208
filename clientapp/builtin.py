"""The two built-in tasks, through the same task interface as a study's own task.

``tabular``: an MLP on a CSV file (a ``target`` column and numeric features); ``images``: a folder
of class sub-folders, with a small CNN (``model = "cnn"``) or, for small images, an MLP on the
flattened pixels (``model = "mlp"``, ``num_features`` = channels x side x side). Their settings are
the kit's run settings (:class:`flowerbed.config.RunSettings`): ``num_features``, ``hidden_units``,
``image_size``, ``image_channels``, ``optimizer`` ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from flowerbed.clientapp.data import DataError, load_site_data
from flowerbed.clientapp.privacy import PrivateTraining
from flowerbed.clientapp.task import evaluate, make_model, train
from flowerbed.config import RunSettings
from flowerbed.task import Metrics


class BuiltinTask:
    """A built-in task: ``kind`` is its model (``mlp``), or None for the run's ``model`` setting."""

    Config = RunSettings

    def __init__(self, name: str, kind: str | None) -> None:
        self.name = name
        self.kind = kind

    def model(self, config: RunSettings) -> nn.Module:
        """The task's model for ``config`` (MLP or CNN, features and classes from the run); the tabular
        MLP standardizes its features first, with statistics from all sites (``standardize_features``)."""
        return make_model(self.kind or config.model, num_features=config.num_features,
                          num_classes=config.num_classes, hidden_units=config.hidden_units,
                          image_size=config.image_size, channels=config.image_channels,
                          scaling=self.name == "tabular")  # fmt: skip

    def load_data(self, path: Path, config: RunSettings) -> tuple[Dataset[Any], Dataset[Any]]:
        """The site's train and validation sets from ``path``."""
        data = load_site_data(
            str(path),
            num_features=config.num_features if self.kind == "mlp" else None,
            channels=config.image_channels,
            num_classes=config.num_classes,
            class_names=config.class_name_list(),
            image_size=config.image_size,
            validation_fraction=config.validation_fraction,
            seed=config.seed,
        )
        values = int(torch.tensor(data.train.tensors[0].shape[1:]).prod())
        if (self.kind or config.model) == "mlp" and data.kind == "images" and values != config.num_features:
            raise DataError(
                f"{path}: its images are {config.image_channels} x {config.image_size} x {config.image_size} = "
                f"{values} values, the run's MLP takes num_features = {config.num_features}: set num_features = "
                f'{values}, or model = "cnn"'
            )
        return data.train, data.validation

    def train(self, model: nn.Module, data: Dataset[Any], config: RunSettings) -> Metrics:
        """Train locally for the run's epochs; returns the train metrics."""
        return self.train_private(model, data, config, None)

    def train_private(
        self, model: nn.Module, data: Dataset[Any], config: RunSettings, private: PrivateTraining | None
    ) -> Metrics:
        """:meth:`train` with DP-SGD under the site's privacy budget (``private``)."""
        loss = train(model, data, epochs=config.local_epochs, batch_size=config.batch_size,  # type: ignore[arg-type]
                     learning_rate=config.learning_rate, proximal_mu=config.proximal_mu, seed=config.seed,
                     optimizer=config.optimizer, momentum=config.momentum, private=private)  # fmt: skip
        return {"loss": loss}

    def evaluate(self, model: nn.Module, data: Dataset[Any], config: RunSettings) -> Metrics:
        """Loss and accuracy of ``model`` on ``data``."""
        result = evaluate(model, data)  # type: ignore[arg-type]
        return {"loss": result.loss, "accuracy": result.accuracy}


tabular = BuiltinTask("tabular", "mlp")
images = BuiltinTask("images", None)
