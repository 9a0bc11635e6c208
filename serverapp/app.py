"""The ServerApp: thin Flower entry point over :mod:`flowerbed.serverapp.loop`."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import asdict
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flowerbed.audit import RUN, anchor_here, append_here
from flowerbed.config import RunSettings
from flowerbed.diskspace import DiskFullError, write_atomic
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.protocol import task_name
from flowerbed.runfolder import (
    HELD_OUT,
    SUMMARY,
    History,
    RoundRow,
    best_evaluation,
    mark_serverapp,
    metric_kinds,
    read_feature_scaling,
    repair,
)
from flowerbed.scaling import scaling_layers
from flowerbed.serverapp.loop import RunFailedError, run_rounds
from flowerbed.serverapp.resume import RESUME_KEY, load_resume_point, resume_row
from flowerbed.serverapp.scaling import standardize
from flowerbed.serverapp.strategies import make_strategy
from flowerbed.superlink.launch import CONTACTS_FILE
from flowerbed.superlink.sites import load_registry
from flowerbed.task import RUN_TASK_WHEEL, load_task, pool_metrics, pools, task_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run rounds until convergence and write history, checkpoints, final model and plot."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    out_dir = Path(str(context.run_config.get("output-dir", "flowerbed-run"))).expanduser()
    if context.run_config.get(RESUME_KEY):
        for note in repair(out_dir):  # a torn last line (a kill or a full disk mid-write) is cut off, kept aside
            log(WARNING, "%s", note)
    resume = load_resume_point(out_dir) if context.run_config.get(RESUME_KEY) else None
    history = History(out_dir, resume.rows if resume else None)
    mark_serverapp(out_dir, context.run_id)
    if resume is not None:
        (out_dir / SUMMARY).unlink(missing_ok=True)  # the run goes on: it has not ended any more
        history.append(resume_row(resume, context.run_id, str(context.run_config.get("resume-why", ""))))
    torch.manual_seed(settings.seed)
    # The same task, hence the same model, as at every site; an own task from the run folder's wheel.
    task = load_task(task_name(settings), settings.task_sha256, out_dir / RUN_TASK_WHEEL)
    build = functools.partial(task.model, task_config(task, dict(context.run_config)))
    model = build()
    # Federated standardization fills the model's scaling layers from the sites' sums before round 1.
    scaler = functools.partial(standardize, build=build) if scaling_layers(model) else None
    initial = [ArrayRecord(model.state_dict())]  # popped into the call below: the rounds are its only holder
    del model  # the rounds hold the global model as Flower's arrays, not this torch copy of it too
    started = time.time()
    summary: dict[str, object] = {"settings": settings.model_dump(), "started": started}
    if resume is not None:
        summary["resumed_from_round"] = resume.round
    try:
        outcome = run_rounds(grid, make_strategy(settings), initial.pop(), settings, history,
                             resume=resume, watch=SiteWatch(FederationLayout(out_dir.parent.parent)),
                             pool=functools.partial(pool_metrics, task) if pools(task) else None,
                             standardize=scaler)  # fmt: skip
    except RunFailedError as exc:
        summary.update(status="failed", stop_reason=str(exc), seconds=round(time.time() - started, 1))
        history.finish(None, summary)
        _audit_end(out_dir, summary)
        # Flower marks a run whose replies all errored as completed: fail it ourselves. An Exception
        # (not SystemExit, which flwr's run_serverapp does not catch) sets the run's status at once,
        # instead of when the task heartbeat expires a minute later.
        raise RuntimeError(f"flowerbed run failed: {exc}") from None
    except DiskFullError as exc:
        # The run ends, said why; the coordinator and its other runs go on. `run --resume` after freeing space.
        summary.update(status="failed", stop_reason=exc.message, seconds=round(time.time() - started, 1))
        with contextlib.suppress(OSError, FlowerbedError):  # the summary is small; it may still fit
            write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=2).encode("utf-8"))
            _audit_end(out_dir, summary)
        raise RuntimeError(f"flowerbed run failed: {exc.message}") from None
    except Exception as exc:
        # A fault of the ServerApp itself: recorded as the end of the run, so that nothing resumes
        # it over and over; `flowerbed run --resume` goes on once it is mended.
        why = f"the ServerApp failed: {type(exc).__name__}: {exc}"
        summary.update(status="failed", stop_reason=why, seconds=round(time.time() - started, 1))
        history.finish(None, summary)
        _audit_end(out_dir, summary)
        raise
    best_model, best_metrics = best_evaluation(history.rows, outcome.best_round, outcome.rounds)
    summary.update(
        status="completed",
        stop_reason=outcome.stop_reason,
        rounds=outcome.rounds,
        best_round=outcome.best_round,
        best_model=best_model,  # "round K", or "the final evaluation (after round N)": never a round N + 1
        target_metric=settings.target_metric,  # the metric that drove the run, and its value for the best model
        best_target_value=best_metrics.get(settings.target_metric),
        best_metrics=best_metrics,
        metric_kinds=metric_kinds([asdict(row) for row in history.rows]),  # pooled or weighted mean, each
        feature_scaling=scaling_summary(out_dir),  # what the features were standardized with, or why not
        held_out=held_out_of(history.rows),  # the final model on the sites' test data (None: not tested)
        best_eval_loss=outcome.best_eval_loss,
        best_eval_accuracy=outcome.best_eval_accuracy,
        privacy=outcome.privacy,
        seconds=round(time.time() - started, 1),
    )
    history.finish(outcome.final_arrays.to_torch_state_dict(), summary)
    _audit_end(out_dir, summary)


def scaling_summary(out_dir: Path) -> dict[str, object] | None:
    """feature_scaling.json without its per-feature vectors (None: the model standardizes nothing)."""
    record = read_feature_scaling(out_dir)
    return {k: v for k, v in record.items() if k not in ("mean", "std")} if record is not None else None


def held_out_of(rows: list[RoundRow]) -> dict[str, object] | None:
    """The run's held-out test figures for its summary: pooled and per site (None: the run had none)."""
    row = next((r for r in reversed(rows) if r.kind == HELD_OUT), None)
    return {"pooled": row.metrics, "per_site": row.per_site} if row is not None else None


class SiteWatch:
    """What the coordinator knows of the sites beyond Flower's replies: revocations and last contacts."""

    def __init__(self, layout: FederationLayout) -> None:
        self.layout = layout

    def _registry(self) -> dict[str, dict[str, object]]:
        try:
            return load_registry(self.layout)
        except (OSError, ValueError):
            return {}

    def revoked(self) -> dict[int, str]:
        """node id -> site for the sites the coordinator revoked (its site registry), read when asked."""
        return {int(str(e["node_id"])): name for name, e in self._registry().items()
                if e.get("revoked") and e.get("node_id")}  # fmt: skip

    def registered(self) -> dict[int, str]:
        """node id -> site for every site the coordinator registered."""
        return {int(str(e["node_id"])): name for name, e in self._registry().items() if e.get("node_id")}

    def last_contact(self) -> dict[int, float]:
        """node id -> when the SuperLink last heard from it (epoch seconds), as its contact log says."""
        try:
            data = json.loads((self.layout.replies / CONTACTS_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return {int(node): float(at) for node, at in data.items()}


def _audit_end(out_dir: Path, summary: dict[str, object]) -> None:
    """The run's end in the coordinator's audit trail, with the gateway's access log anchored."""
    anchor_here("serverapp")
    append_here(RUN, "serverapp", event="ended", run=out_dir.name, status=summary.get("status"),
                stop_reason=summary.get("stop_reason"), rounds=summary.get("rounds"),
                epsilon=summary.get("privacy"))  # fmt: skip
