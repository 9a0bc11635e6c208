"""``flowerbed demo``: the whole federation on this machine, then a comparison table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.text import Text

from flowerbed.console import err, info, out, table
from flowerbed.runfolder import PLOT, read_settings
from flowerbed.views import best_line, history_table, scaling_line, settings_table

HELP = (
    "Run a TLS federation on this machine (gateway, SuperLink, ServerApp, SuperNodes; 5 sites of "
    "label-skewed digit images), then compare local-only, federated and centralized models."
)


def _signed(points: float | None) -> str:
    return "-" if points is None else f"{points:+.1f}"


def demo(
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Folder for the throw-away federation (default: a temp folder).")
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="digits (5 sites, PNG image folders, where federation pays) or breast-cancer "
            "(3 sites, CSV: tabular data too easy to need federation)."
        ),
    ] = "digits",
) -> None:
    from flowerbed.demo import COMPARISON, FEDERATED, run_demo  # torch is imported only when the demo runs

    started = time.monotonic()
    with Live(console=err, refresh_per_second=2, transient=True) as live:

        def update(rows: list[dict[str, Any]]) -> None:
            title = f"demo run: {len(rows)} rounds, {time.monotonic() - started:.0f} s elapsed"
            live.update(history_table(rows, title))

        result = run_demo(
            work_dir,
            report=lambda m: live.console.print(Text.assemble(("›", "dim"), " ", m)),
            on_rows=update,
            data_set=data,
        )
    out.print(settings_table([(r["key"], r["value"], r["source"]) for r in read_settings(result.out_dir)]))
    out.print(history_table(result.run.rows, "Federated rounds"))
    out.print(best_line(result.run.run_id, result.run.summary))
    scaled = scaling_line(result.run.summary.get("feature_scaling"))
    if scaled:
        out.print(scaled)
    federated = next(c.accuracy for c in result.comparisons if c.model == FEDERATED)
    out.print(
        table(
            "Held-out test set (same data for every model)",
            ["model", "train examples", "accuracy", "loss", "federated is ahead by (points)"],
            (
                [c.model, c.train_examples, c.accuracy, c.loss, _signed(c.gap_points(federated))]
                for c in result.comparisons
            ),
        )
    )
    out.print(f"table: {result.out_dir / COMPARISON}; evidence report: {result.out_dir / 'report.html'}")
    out.print(f"stopped: {result.run.summary.get('stop_reason')} in {time.monotonic() - started:.0f} s")
    out.print(f"plot: {result.out_dir / PLOT}")
    info(f"everything is in {result.work_dir} (all processes are stopped)")
