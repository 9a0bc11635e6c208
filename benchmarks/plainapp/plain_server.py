"""A plain Flower ServerApp for the benchmarks: Flower's FedAvg.start with its defaults, one exchange per round.

It trains the same model as flowerbed's ServerApp (the run's built-in task); each round's end time goes
to the JSON file named by the run config key ``times-file`` (or the env var BENCH_TIMES_FILE).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerbed.config import RunSettings
from flowerbed.protocol import task_name
from flowerbed.task import load_task, task_config

app = ServerApp()


def run_config(context: Context) -> dict[str, Any]:
    extra: dict[str, Any] = json.loads(os.environ.get("BENCH_RUN_CONFIG", "{}"))  # the simulation has none
    return dict(context.run_config) | extra


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = run_config(context)
    settings = RunSettings.from_run_config(config)
    task = load_task(task_name(settings))
    model = task.model(task_config(task, config))
    times_file = Path(os.environ.get("BENCH_TIMES_FILE") or str(config["times-file"]))
    times: list[float] = []

    def stamp(_round: int, _arrays: ArrayRecord) -> None:
        times.append(time.time())
        times_file.write_text(json.dumps(times), encoding="utf-8")

    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=settings.min_nodes, min_available_nodes=settings.min_nodes)
    strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=settings.max_rounds, evaluate_fn=stamp)
