"""``flowerbed env``: environment files for the workspace VMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.artifacts import read_task_wheel, task_requirements
from flowerbed.console import out
from flowerbed.deploy.condaenv import Role, render

app = typer.Typer(help="Generate environment files for workspace VMs.", no_args_is_help=True)


@app.command("conda", help="Print (or write) the conda env file for a role: superlink, supernode-cpu, supernode-cuda.")
def conda(
    role: Annotated[Role, typer.Option(help="Which machine the environment is for.")],
    write: Annotated[Path | None, typer.Option(help="Write ROLE.yml into this folder instead of printing.")] = None,
    task: Annotated[
        list[Path] | None, typer.Option("--task", help="An own task's wheel: add its dependencies (repeat it).")
    ] = None,
) -> None:
    infos = [read_task_wheel(path) for path in task or []]
    text = render(role, [i.path.name for i in infos], task_requirements(infos))
    if write is None:
        typer.echo(text, nl=False)
        return
    write.mkdir(parents=True, exist_ok=True)
    path = write / f"{role}.yml"
    path.write_text(text, encoding="utf-8")
    out.print(f"wrote {path}")
