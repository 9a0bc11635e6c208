"""``flowerbed demo``: the whole federation on this machine, then a comparison table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.text import Text

from flowerbed.commands.run import history_table
from flowerbed.console import err, info, out, table
from flowerbed.serverapp.history import PLOT

HELP = (
    "Run a three-site TLS federation on this machine (gateway, SuperLink, ServerApp, SuperNodes), "
    "then compare local-only, federated and centralized models."
)


def demo(
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Folder for the throw-away federation (default: a temp folder).")
    ] = None,
) -> None:
    from flowerbed.demo import run_demo  # torch is imported only when the demo runs

    started = time.monotonic()
    with Live(console=err, refresh_per_second=2, transient=True) as live:

        def update(rows: list[dict[str, Any]]) -> None:
            title = f"demo run: {len(rows)} rounds, {time.monotonic() - started:.0f} s elapsed"
            live.update(history_table(rows, title))

        result = run_demo(
            work_dir, report=lambda m: live.console.print(Text.assemble(("›", "dim"), " ", m)), on_rows=update
        )
    out.print(history_table(result.run.rows, "Federated rounds"))
    out.print(
        table(
            "Held-out test set (same data for every model)",
            ["model", "train examples", "accuracy", "loss"],
            ([c.model, c.train_examples, c.accuracy, c.loss] for c in result.comparisons),
        )
    )
    out.print(f"stopped: {result.run.summary.get('stop_reason')} in {time.monotonic() - started:.0f} s")
    out.print(f"plot: {result.out_dir / PLOT}")
    info(f"everything is in {result.work_dir} (all processes are stopped)")
