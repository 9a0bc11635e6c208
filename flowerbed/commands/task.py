"""``flowerbed task``: a study's own task as a package: scaffold, check without Flower, build its wheel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.console import err, info, out, table
from flowerbed.errors import FlowerbedError
from flowerbed.taskpkg import TaskCodeError, build_source, check_source, new_task

app = typer.Typer(help="Your own task (model, data loading, training, metrics) as a package.", no_args_is_help=True)


@app.command("new", help="Write a small installable task package: pyproject, task module, a test, a README.")
def new(
    name: Annotated[str, typer.Argument(help="Task name (lower-case letters, digits, hyphens).")],
    folder: Annotated[Path, typer.Option("--dir", help="Where to create the NAME folder.")] = Path(),
) -> None:
    root = new_task(folder, name)
    out.print(f"created {root}: fill in {root.name}'s task.py (see its README), then `flowerbed task check {root}`")


@app.command("check", help="Check the interface, the data load_data reads, and one local round (no Flower).")
def check(
    path: Annotated[Path, typer.Argument(help="The task package folder.")] = Path(),
    data: Annotated[
        list[Path] | None, typer.Option(help="Local data to try (repeat it; default: the task's example_data).")
    ] = None,
    show_traceback: Annotated[
        bool, typer.Option("--traceback", help="When the task's code fails, print the whole trace too.")
    ] = False,
) -> None:
    """Run the checks; print each data file's summary and its local round, or what is wrong in one line."""
    try:
        result = check_source(path, data)
    except TaskCodeError as exc:
        if show_traceback:
            err.print(exc.trace, markup=False, highlight=False)
        raise
    for file, summaries, local in result.files:
        out.print(table(f"{file}: the data load_data read", ["split", "rows", "features", "classes (count)", "NaN/inf",
                                                               "labels"],
                        ([s.split, s.rows, s.features, ", ".join(f"{c}: {n}" for c, n in sorted(s.classes.items())),
                          s.non_finite, s.label_range] for s in summaries)))  # fmt: skip
        names = sorted(set(local.before) | set(local.after))
        out.print(
            table(f"One local round: {local.num_train} train, {local.num_validation} validation examples",
                  ["metric", "before training", "after training"],
                  ([n, f"{local.before.get(n, float('nan')):.4f}", f"{local.after.get(n, float('nan')):.4f}"]
                   for n in names))
        )  # fmt: skip
        for metric, value in local.pooled.items():
            out.print(f"pooled {metric} {value:.4f} (from the statistics this data gave: a run sums every site's)")
    if result.problems:
        raise FlowerbedError(
            f"task check found {len(result.problems)} problem(s) in the data: fix load_data or the "
            "data, then check again",
            details=result.problems,
        )
    out.print(f"task check passed; build it with `flowerbed task build {path}`")


@app.command("build", help="Build the task's wheel (offline) and print its sha256 for the sites to approve.")
def build(
    path: Annotated[Path, typer.Argument(help="The task package folder.")] = Path(),
    dist: Annotated[Path | None, typer.Option(help="Where to write the wheel (default: PATH/dist).")] = None,
) -> None:
    wheel, digest = build_source(path, dist or path / "dist", info)
    out.print(f"{wheel}")
    out.print(f"sha256 {digest}")
