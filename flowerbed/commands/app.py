"""``flowerbed app``: a Flower App of one's own, scaffolded offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.appnew import new_app
from flowerbed.console import info, out

app = typer.Typer(help="A Flower App of your own (ServerApp + ClientApp), run with `flowerbed run --app`.",
                  no_args_is_help=True)  # fmt: skip


@app.command("new", help="Write a minimal Flower App offline (flwr new needs the internet).")
def new(
    name: Annotated[str, typer.Argument(help="App name (lower-case letters, digits, hyphens).")],
    api: Annotated[str, typer.Option(help="numpy (logistic regression) or pytorch (a small MLP).")] = "numpy",
    folder: Annotated[Path, typer.Option("--dir", help="Where to write it.", file_okay=False)] = Path(),
) -> None:
    """Write the app's pyproject, ServerApp, ClientApp and README; say how to approve and run it."""
    if api not in ("numpy", "pytorch"):
        raise typer.BadParameter("choose numpy or pytorch", param_hint="--api")
    root = new_app(folder, name, "pytorch" if api == "pytorch" else "numpy")
    out.print(f"created {root} ({api} API): each site approves it, then `flowerbed run --app {root}`")
    info(f"at each site: `flowerbed supernode approve {root} --yes` in its kit folder")
