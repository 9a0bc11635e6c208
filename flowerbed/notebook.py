"""A small Python API for a researcher's notebook on the coordinator host.

    from flowerbed import Federation
    fed = Federation("~/fed")
    run = fed.run(max_rounds=10, target_value=0.95)
    run.watch()                  # one line per round as it ends
    run.history                  # a pandas DataFrame, one row per round
    model = run.model()          # the final model, a torch module

It drives the same functions as ``flowerbed run``: the settings are validated the same way, the
run goes to the coordinator's running SuperLink, and its output is the usual run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerbed.ckks import manifest_of_file as ckks_manifest
from flowerbed.config import load_federation
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.protocol import task_name
from flowerbed.runfolder import (
    FINAL_EVAL,
    FINAL_MODEL,
    PLOT,
    SUMMARY,
    TRAIN,
    metric_column,
    metric_kinds,
    read_rows,
    read_settings,
    run_id_of,
)
from flowerbed.runner import RunHandle, follow, prepare, run_folder, run_overview, stored_settings, submit
from flowerbed.task import RUN_TASK_WHEEL, load_task, task_config

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise FlowerbedError("the notebook API's tables need pandas: `pip install pandas`") from None
    return pandas


def _round_line(row: dict[str, Any]) -> str:
    final = row.get("kind") == FINAL_EVAL  # the last model's own evaluation: no round of its own
    parts = [*(["final evaluation"] if final else [f"round {row['round']}", f"{row.get('kind', TRAIN)}"]),
             f"{row['nodes']} site(s)"]  # fmt: skip
    for key, label in (("eval_loss", "eval loss"), ("eval_accuracy", "eval acc")):
        if row.get(key) is not None:
            parts.append(f"{label} {float(row[key]):.4f}")
    own = {k: v for k, v in row.get("metrics", {}).items() if k.startswith("eval-")}
    parts += [
        f"{k.removeprefix('eval-')} {float(v):.4f}" for k, v in own.items() if k not in ("eval-loss", "eval-accuracy")
    ]
    parts += [f"eps {site} {value:.2f}" for site, value in row.get("privacy", {}).items()]
    parts.append(f"{float(row['seconds']):.1f} s")
    if row.get("stop_reason"):
        parts.append(f"stop: {row['stop_reason']}")
    return ", ".join(parts)


@dataclass
class Run:
    """One run of the federation: its folder under ``runs/`` and its current Flower run."""

    federation: Federation
    name: str

    @property
    def folder(self) -> Path:
        """The run's folder under runs/."""
        return run_folder(self.federation.layout, self.name)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The history rows written so far (dicts)."""
        return read_rows(self.folder)

    @property
    def history(self) -> pd.DataFrame:
        """One row per round (trained rounds, waits, resumes) and the final evaluation (``kind``
        ``final-eval``, no round of its own), with every metric the task reports as its own column,
        named as in history.csv (``eval_auroc``), and each DP site's epsilon as ``eps SITE``."""
        records = []
        for row in self.rows:
            record = {k: v for k, v in row.items() if k not in ("metrics", "privacy", "errors", "per_site")}
            record |= {metric_column(k): v for k, v in row.get("metrics", {}).items() if metric_column(k) not in record}
            record |= {f"eps {site}": value for site, value in row.get("privacy", {}).items()}
            if row.get("kind") == FINAL_EVAL:
                record["round"] = None
            records.append(record)
        return _pandas().DataFrame(records)

    @property
    def metric_kinds(self) -> dict[str, str]:
        """Each evaluation metric and how the sites' results combine: ``pooled`` or ``weighted mean``."""
        return metric_kinds(self.rows)

    @property
    def settings(self) -> pd.DataFrame:
        """The settings the run trained with (columns key, value, source: federation.toml, flag, a default)."""
        return _pandas().DataFrame(read_settings(self.folder), columns=["key", "value", "source"])

    @property
    def summary(self) -> dict[str, Any] | None:
        """summary.json once the run ended (status, stop reason, best round ...), else None."""
        import json

        path = self.folder / SUMMARY
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    @property
    def status(self) -> str:
        """``completed``, ``failed`` or ``stopped`` once it ended, else ``running``."""
        summary = self.summary
        return str(summary["status"]) if summary else "running"

    @property
    def plot(self) -> Path:
        """The metrics plot (written when the run ends)."""
        return self.folder / PLOT

    def watch(self, timeout_s: float = 3600, echo: bool = True) -> dict[str, Any]:
        """Follow the run until it ends, printing one line per round; returns its summary.

        A run that failed raises :class:`FlowerbedError` with the stop reason.
        """
        said = 0

        def show(rows: list[dict[str, Any]]) -> None:
            nonlocal said
            for row in rows[said:]:
                if echo:
                    print(_round_line(row), flush=True)  # noqa: T201 - the notebook's output
            said = max(said, len(rows))

        run_id = run_id_of(self.folder) or 0
        result = follow(self.federation.layout, RunHandle(run_id, self.folder), on_rows=show, timeout_s=timeout_s)
        show(result.rows)
        summary = result.summary or self.summary or {}
        if summary.get("status") != "completed":
            raise FlowerbedError(f"run {self.name} ended {result.status}: {summary.get('stop_reason', 'no summary')}")
        return summary

    def model(self) -> nn.Module:
        """The run's final model (the best evaluated one), with its task's architecture."""
        import torch

        path = self.folder / FINAL_MODEL
        if not path.exists():
            raise FlowerbedError(f"run {self.name} has no final model yet ({path}): wait for it with run.watch()")
        sealed = ckks_manifest(path)
        if sealed is not None:
            raise FlowerbedError(
                f"run {self.name}'s final model is encrypted with CKKS key {sealed.key_id}: only the sites can "
                f"decrypt it (copy {path} to a site and run `flowerbed supernode decrypt-model` there)"
            )
        settings = stored_settings(self.folder)
        wheel = self.folder / RUN_TASK_WHEEL
        task = load_task(task_name(settings), settings.task_sha256, wheel if wheel.exists() else None)
        model = task.model(task_config(task, settings.to_run_config()))
        model.load_state_dict(torch.load(path, weights_only=True))
        return model


class Federation:
    """A federation folder on the coordinator host (``flowerbed init`` made it; its SuperLink runs)."""

    def __init__(self, folder: str | Path) -> None:
        self.layout = FederationLayout(Path(folder).expanduser())
        self.config = load_federation(self.layout.root)

    def run(self, task: str | None = None, name: str | None = None, **settings: Any) -> Run:
        """Submit a run (returns at once; ``Run.watch()`` follows it).

        ``task``: a built-in task, an own task's wheel path or its name; ``settings``: any run setting
        of federation.toml's ``[run]`` (``max_rounds=10``, ``target_value=0.9``, ``dp="sample"`` ...).
        """
        prepared = prepare(self.layout, self.config, settings, task=task)
        for warning in prepared.warnings:
            print(f"warning: {warning}")  # noqa: T201
        handle = submit(self.layout, prepared.settings, name or time.strftime("nb-%Y%m%d-%H%M%S"),
                        control_port=self.config.superlink.internal_port, task_wheel=prepared.chosen.wheel,
                        effective=prepared.effective)  # fmt: skip
        return Run(self, handle.out_dir.name)

    def get(self, name: str) -> Run:
        """A run by its folder name under ``runs/``."""
        run_folder(self.layout, name)  # refuses an unknown name, listing the runs there are
        return Run(self, name)

    def runs(self) -> pd.DataFrame:
        """Every run: Flower run id, status, rounds, resumes, best eval accuracy, stop reason."""
        rows = run_overview(self.layout)
        return _pandas().DataFrame([vars(row) for row in rows])
