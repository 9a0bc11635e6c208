"""``flowerbed run``: submit the Flower App and show live progress, then a table and the plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.live import Live

from flowerbed.config import RunSettings, load_federation
from flowerbed.console import err, out, table
from flowerbed.layout import FederationLayout
from flowerbed.options import FED_DIR
from flowerbed.runner import RunHandle, RunResult, check_result, follow, submit
from flowerbed.serverapp.history import PLOT

HELP = "Submit a federated run to the local SuperLink and follow it until it stops."
COLUMNS = ["round", "nodes", "failed", "train loss", "eval loss", "eval acc", "s", "stop"]


def history_table(rows: list[dict[str, Any]], title: str) -> Any:
    return table(
        title,
        COLUMNS,
        (
            [r["round"], r["nodes"], r["failures"], r["train_loss"], r["eval_loss"],
             r["eval_accuracy"], r["seconds"], r["stop_reason"]]
            for r in rows
        ),
    )  # fmt: skip


def follow_live(layout: FederationLayout, handle: RunHandle, timeout_s: float) -> RunResult:
    """Follow a run with a live table (round, nodes, losses, accuracy, elapsed)."""
    started = time.monotonic()
    with Live(console=err, refresh_per_second=2, transient=False) as live:

        def update(rows: list[dict[str, Any]]) -> None:
            elapsed = time.monotonic() - started
            title = f"run {handle.run_id}: round {len(rows)} done, {elapsed:.0f} s elapsed"
            live.update(history_table(rows, title))

        return follow(layout, handle, on_rows=update, timeout_s=timeout_s)


def run(
    fed_dir: Path = FED_DIR,
    strategy: str | None = typer.Option(None, help="fedavg, fedprox, fedadam or fedmedian."),
    max_rounds: int | None = typer.Option(None, help="Stop after this many rounds."),
    min_nodes: int | None = typer.Option(None, help="Fail a round with fewer valid replies."),
    target_value: float | None = typer.Option(None, help="Stop when the eval metric reaches it."),
    patience: int | None = typer.Option(None, help="Rounds without eval-loss improvement."),
    time_budget_s: float | None = typer.Option(None, help="Wall-time budget in seconds."),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round."),
    learning_rate: float | None = typer.Option(None, help="Local learning rate."),
    proximal_mu: float | None = typer.Option(None, help="FedProx mu."),
    name: str | None = typer.Option(None, help="Run folder name under runs/ (default: timestamp)."),
    follow_run: bool = typer.Option(True, "--follow/--no-follow", help="Show progress until it stops."),
) -> None:
    layout = FederationLayout(fed_dir)
    config = load_federation(fed_dir)
    overrides = {
        k: v
        for k, v in {
            "strategy": strategy, "max_rounds": max_rounds, "min_nodes": min_nodes,
            "target_value": target_value, "patience": patience, "time_budget_s": time_budget_s,
            "local_epochs": local_epochs, "learning_rate": learning_rate, "proximal_mu": proximal_mu,
        }.items()
        if v is not None
    }  # fmt: skip
    settings = RunSettings.model_validate(config.run.model_dump() | overrides)
    handle = submit(layout, settings, name)
    out.print(f"submitted run {handle.run_id}; output in {handle.out_dir}")
    if not follow_run:
        return
    result = follow_live(layout, handle, settings.time_budget_s + settings.round_timeout_s + 300)
    check_result(result, handle)
    summary = result.summary
    out.print(
        f"run {handle.run_id} stopped: {summary.get('stop_reason')} after {summary.get('rounds')} "
        f"rounds; best eval accuracy {summary.get('best_eval_accuracy'):.4f} (round "
        f"{summary.get('best_round')})"
    )
    out.print(f"plot: {handle.out_dir / PLOT}   history: {handle.out_dir / 'history.csv'}")
