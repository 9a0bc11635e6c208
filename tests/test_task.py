"""The task interface: the built-in tasks go through it, a study's own task with its own metric drives the run.

Real data files, real torch training; no Flower (the run tests cover the Flower path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from flowerbed.clientapp.builtin import images, tabular
from flowerbed.config import ConfigError, RunSettings
from flowerbed.demodata import make_demo_data
from flowerbed.errors import FlowerbedError
from flowerbed.protocol import task_name
from flowerbed.serverapp.criteria import PLATEAU, TARGET, ConvergenceTracker
from flowerbed.task import Task, available, check_metrics, load_task, local_round, task_config
from tests.conftest import SITES


class AurocTask:
    """A study's own task, written against the interface: logistic regression reporting AUROC."""

    name = "auroc-study"

    class Config(BaseModel):
        epochs: int = 20
        learning_rate: float = 0.5

    def model(self, config: Config) -> nn.Module:
        return nn.Linear(2, 1)

    def load_data(self, path: Path, config: Config) -> tuple[Dataset[Any], Dataset[Any]]:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(200, 2)).astype("float32")
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return torch.utils.data.Subset(data, range(150)), torch.utils.data.Subset(data, range(150, 200))

    def train(self, model: nn.Module, data: Dataset[Any], config: Config) -> dict[str, float]:
        x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=1000)))  # type: ignore[arg-type]
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
        loss = torch.tensor(0.0)
        for _ in range(config.epochs):
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            loss.backward()
            optimizer.step()
        return {"loss": float(loss)}

    def evaluate(self, model: nn.Module, data: Dataset[Any], config: Config) -> dict[str, float]:
        x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=1000)))  # type: ignore[arg-type]
        with torch.no_grad():
            scores = model(x).squeeze(1)
            loss = float(nn.functional.binary_cross_entropy_with_logits(scores, y))
        pos, neg = scores[y == 1], scores[y == 0]
        auroc = float((pos[:, None] > neg[None, :]).float().mean())  # Mann-Whitney U statistic
        return {"loss": loss, "auroc": auroc}


def test_the_built_in_tasks_are_tasks_and_run_a_local_round(tmp_path: Path) -> None:
    assert {"tabular", "images"} <= set(available())
    assert isinstance(load_task("tabular"), Task) and load_task("images") is images
    csv = make_demo_data(tmp_path / "demo", SITES).site_files[SITES[0]]
    settings = task_config(tabular, RunSettings().to_run_config() | {"local-epochs": 3})
    result = local_round(tabular, csv, settings)
    assert result.num_train > 100 and set(result.after) == {"loss", "accuracy"}
    assert result.after["loss"] < result.before["loss"]  # it trained
    for label in range(2):
        (tmp_path / "img" / f"c{label}").mkdir(parents=True)
        for i in range(6):
            pixels = np.full((8, 8, 3), 200 * label + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / f"c{label}" / f"{i}.png")
    config = task_config(images, {"model": "cnn", "image-size": 8, "num-classes": 2})
    assert local_round(images, tmp_path / "img", config).num_train + 2 >= 10


def test_the_task_a_run_uses() -> None:
    assert task_name(RunSettings()) == "tabular"
    assert task_name(RunSettings(model="cnn")) == "images"
    assert task_name(RunSettings(task="auroc-study")) == "auroc-study"
    with pytest.raises(FlowerbedError, match=r"'nope' is not a built-in task \(images, tabular\); .*--task TASK.whl"):
        load_task("nope")
    with pytest.raises(FlowerbedError, match=r"task nope \(sha256 000000000000\) is not approved here"):
        load_task("nope", "0" * 64)  # an own task is imported from an approved wheel only


def test_an_own_task_with_its_own_metric_drives_the_run(tmp_path: Path) -> None:
    task = AurocTask()
    assert isinstance(task, Task)
    config = task_config(task, {"epochs": 30, "model": "ignored: not a key of this task"})
    result = local_round(task, tmp_path, config)
    assert result.after["auroc"] > 0.9 > result.before["auroc"] - 0.5
    tracker = ConvergenceTracker(RunSettings(target_metric="auroc", target_value=0.9, patience=5))
    assert tracker.observe(1, result.before["loss"], None, {"auroc": 0.6}) is None
    assert tracker.observe(2, result.after["loss"], None, result.after) == TARGET
    with pytest.raises(ConfigError, match="task auroc-study: invalid run settings"):
        task_config(task, {"epochs": "many"})
    # The task's own settings: [run.task_settings] / --task-setting, flattened by Flower as task-settings.KEY.
    own = RunSettings(task_settings={"epochs": 7}).to_run_config()
    assert own["task-settings"] == {"epochs": 7} and task_config(task, own).epochs == 7  # type: ignore[attr-defined]
    assert task_config(task, {"task-settings.epochs": 9}).epochs == 9  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"task auroc-study has no setting dropout \(its settings: .*epochs"):
        task_config(task, {"task-settings.dropout": 0.2})


def test_a_lower_is_better_metric_and_plateau() -> None:
    tracker = ConvergenceTracker(RunSettings(target_metric="val-loss", target_value=0.2, patience=2))
    assert RunSettings(target_metric="val-loss").target_direction() == "min"
    assert RunSettings(target_metric="sensitivity", target_mode="max").target_direction() == "max"
    assert tracker.observe(1, 0.5, None, {"val-loss": 0.3}) is None
    assert tracker.observe(2, 0.5, None, {"val-loss": 0.19}) == TARGET
    plateau = ConvergenceTracker(RunSettings(target_metric="auroc", target_value=0.99, patience=2))
    assert plateau.observe(1, 0.5, None, {"auroc": 0.7}) is None
    assert plateau.observe(2, 0.6, None, {"auroc": 0.7}) is None
    assert plateau.observe(3, 0.6, None, {"auroc": 0.7}) == PLATEAU
    with pytest.raises(ValueError, match="not a metric name"):
        RunSettings(target_metric="au roc")


def test_metrics_that_are_not_named_floats_are_named() -> None:
    assert check_metrics({"auroc": np.float32(0.5), "n": 3}, "t.evaluate") == {"auroc": 0.5, "n": 3.0}
    with pytest.raises(FlowerbedError, match=r"t\.evaluate returned list, not a dict"):
        check_metrics([0.5], "t.evaluate")
    with pytest.raises(FlowerbedError, match=r"auroc=.high., not a number"):
        check_metrics({"auroc": "high"}, "t.evaluate")


def test_table_history_and_plot_show_every_metric(tmp_path: Path) -> None:
    from dataclasses import asdict

    from rich.console import Console

    from flowerbed.runfolder import History, RoundRow
    from flowerbed.views import history_table

    history = History(tmp_path / "run")
    for n, auroc in ((1, 0.61), (2, 0.83)):
        history.append(RoundRow(n, 2, 0, 0.5, 0.4, None, 3.0, metrics={"eval-loss": 0.4, "eval-auroc": auroc}))
    console = Console(width=200, record=True, markup=False)
    console.print(history_table([asdict(r) for r in history.rows], "run 1"))
    text = console.export_text()
    assert "auroc" in text and "0.8300" in text
    history.finish(None, {"status": "completed"})
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
    assert '"eval-auroc": 0.83' in (tmp_path / "run" / "history.jsonl").read_text()
