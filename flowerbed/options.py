"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import typer

FED_DIR = typer.Option(
    Path(),
    "--dir",
    "-d",
    envvar="FLOWERBED_DIR",
    help="Federation folder (holds federation.toml).",
    file_okay=False,
)
