"""``flowerbed task``: a study's own task as a package: scaffold, check without Flower, build its wheel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.console import info, out, table
from flowerbed.taskpkg import build_source, check_source, new_task

app = typer.Typer(help="Your own task (model, data loading, training, metrics) as a package.", no_args_is_help=True)


@app.command("new", help="Write a small installable task package: pyproject, task module, a test, a README.")
def new(
    name: Annotated[str, typer.Argument(help="Task name (lower-case letters, digits, hyphens).")],
    folder: Annotated[Path, typer.Option("--dir", help="Where to create the NAME folder.")] = Path(),
) -> None:
    root = new_task(folder, name)
    out.print(f"created {root}: fill in {root.name}'s task.py (see its README), then `flowerbed task check {root}`")


@app.command("check", help="Check the interface and run one local round (no Flower) on --data or example data.")
def check(
    path: Annotated[Path, typer.Argument(help="The task package folder.")] = Path(),
    data: Annotated[Path | None, typer.Option(help="Local data to try (default: the task's example_data).")] = None,
) -> None:
    result = check_source(path, data)
    names = sorted(set(result.before) | set(result.after))
    out.print(
        table(f"One local round: {result.num_train} train, {result.num_validation} validation examples",
              ["metric", "before training", "after training"],
              ([n, f"{result.before.get(n, float('nan')):.4f}", f"{result.after.get(n, float('nan')):.4f}"]
               for n in names))
    )  # fmt: skip
    out.print(f"task check passed in {result.seconds:.1f} s; build it with `flowerbed task build {path}`")


@app.command("build", help="Build the task's wheel (offline) and print its sha256 for the sites to approve.")
def build(
    path: Annotated[Path, typer.Argument(help="The task package folder.")] = Path(),
    dist: Annotated[Path | None, typer.Option(help="Where to write the wheel (default: PATH/dist).")] = None,
) -> None:
    wheel, digest = build_source(path, dist or path / "dist", info)
    out.print(f"{wheel}")
    out.print(f"sha256 {digest}")
