"""``flowerbed report RUN``: the run's evidence report, one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.commands.common import FedDir
from flowerbed.console import out
from flowerbed.layout import FederationLayout

HELP = "Write a run's evidence report (HTML with plots): convergence, participation, epsilon, baselines, audit."


def report(
    name: Annotated[str, typer.Argument(help="The run's folder name under runs/.")],
    fed_dir: FedDir = Path(),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Where to write it (default: runs/NAME/report.html).")
    ] = None,
) -> None:
    from flowerbed.report import write_report  # matplotlib only when a report is written

    path = write_report(FederationLayout(fed_dir), name, out_file)
    out.print(f"wrote {path}")
