"""The task interface: a study's model, data loading, training loop and metrics.

A task is any object with the members of :class:`Task`; flowerbed's ServerApp and ClientApp call
only these, so the built-in tasks (``tabular``: an MLP on a CSV file, ``images``: a small CNN on
folders of class sub-folders) and a research group's own task take the same path. Metrics are
named floats; every metric a task reports reaches the history, the table and the plot, and any
of them can drive the run (``target_metric``, ``target_mode``).

Tasks are found by name: the built-ins, then the ``flowerbed.tasks`` entry points of the installed
packages (``[project.entry-points."flowerbed.tasks"] NAME = "module:object"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from flowerbed.config import ConfigError, format_validation_error
from flowerbed.errors import FlowerbedError

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

Metrics = dict[str, float]
ENTRY_POINTS = "flowerbed.tasks"
BUILTIN = {"tabular": "flowerbed.clientapp.builtin:tabular", "images": "flowerbed.clientapp.builtin:images"}


@runtime_checkable
class Task(Protocol):
    """What a task provides. ``config`` is an instance of the task's own ``Config`` model."""

    name: str
    Config: type[BaseModel]  # the task's own run-config keys, with defaults, validated by pydantic

    def model(self, config: Any) -> nn.Module:
        """A fresh model (the same architecture at the coordinator and every site)."""
        ...

    def load_data(self, path: Path, config: Any) -> tuple[Dataset[Any], Dataset[Any]]:
        """The site's (train, validation) data from ``path``; raise ``DataError`` naming what is wrong."""
        ...

    def train(self, model: nn.Module, data: Dataset[Any], config: Any) -> Metrics:
        """Train ``model`` in place on ``data``; metrics of the training (e.g. ``loss``)."""
        ...

    def evaluate(self, model: nn.Module, data: Dataset[Any], config: Any) -> Metrics:
        """Metrics of ``model`` on ``data`` (e.g. ``loss``, ``accuracy``, ``auroc``)."""
        ...


def _load_object(target: str) -> Any:
    import importlib

    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def available() -> dict[str, str]:
    """Task name -> ``module:object`` of every task this environment can run."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINTS):
        found.setdefault(ep.name, ep.value)
    return found


def load_task(name: str) -> Task:
    """The task called ``name``, checked against the interface."""
    tasks = available()
    if name not in tasks:
        raise FlowerbedError(
            f"no task {name!r} in this environment (tasks: {', '.join(sorted(tasks))}); "
            "install its wheel (`pip install TASK.whl`) on the coordinator and at every site"
        )
    task = _load_object(tasks[name])
    check_interface(task, name)
    return task  # type: ignore[no-any-return]


def check_interface(task: Any, name: str) -> None:
    """Every member of :class:`Task` is there, and ``Config`` is a pydantic model with defaults."""
    missing = [m for m in ("name", "Config", "model", "load_data", "train", "evaluate") if not hasattr(task, m)]
    if missing:
        raise FlowerbedError(f"task {name!r} lacks {', '.join(missing)} (see flowerbed.task.Task)")
    config_model = task.Config
    if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
        raise FlowerbedError(f"task {name!r}: Config must be a pydantic BaseModel class")


def task_config(task: Task, values: dict[str, Any]) -> BaseModel:
    """The task's own settings from run-config ``values`` (kebab- or snake-case keys; others ignored)."""
    fields = set(task.Config.model_fields)
    data = {k.replace("-", "_"): v for k, v in values.items()}
    try:
        return task.Config.model_validate({k: v for k, v in data.items() if k in fields})
    except ValidationError as exc:
        details = format_validation_error(f"task {task.name}", exc)
        raise ConfigError(f"task {task.name}: invalid run settings ({len(details)} problem(s))", details) from None


def check_metrics(metrics: Any, what: str) -> Metrics:
    """A task's metrics as named finite-or-NaN floats; anything else is the task's error, said plainly."""
    if not isinstance(metrics, dict):
        raise FlowerbedError(f"{what} returned {type(metrics).__name__}, not a dict of named floats")
    out: Metrics = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key or any(c in key for c in " :,"):
            raise FlowerbedError(f"{what} returned a metric named {key!r}: use names like 'auroc'")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise FlowerbedError(f"{what} returned {key}={value!r}, not a number") from None
    return out


@dataclass(frozen=True)
class LocalRound:
    """What one local round of a task did (no Flower involved)."""

    num_train: int
    num_validation: int
    before: Metrics
    train: Metrics
    after: Metrics
    seconds: float


def local_round(task: Task, data_path: Path, config: BaseModel) -> LocalRound:
    """Load, evaluate, train and evaluate again, as a site does in one round; checks the metrics."""
    start = time.monotonic()
    train_data, validation = task.load_data(data_path, config)
    model = task.model(config)
    before = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    trained = check_metrics(task.train(model, train_data, config), f"{task.name}.train")
    after = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    for metrics in (before, after):
        if not any(math.isfinite(v) for v in metrics.values()):
            raise FlowerbedError(f"{task.name}.evaluate returned no finite metric: {metrics}")
    return LocalRound(len(train_data), len(validation), before, trained, after, time.monotonic() - start)  # type: ignore[arg-type]
