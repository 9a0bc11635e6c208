"""``flowerbed bundle``: offline install bundles for VMs without package access."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.console import info, out
from flowerbed.deploy.bundle import bundle_wheels
from flowerbed.deploy.condaenv import CPU_INDEX, Role

app = typer.Typer(help="Bundle everything a VM needs to install offline.", no_args_is_help=True)


@app.command("wheels", help="Download every wheel the SuperNode environment needs into one folder.")
def wheels(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to fill.")] = Path("wheels"),
    role: Annotated[Role, typer.Option(help="Which machine the bundle is for.")] = Role.supernode_cpu,
    platform: Annotated[
        str | None,
        typer.Option(
            help="Target OS: linux (any x86_64 glibc Linux), windows, or one pip platform tag (default: this machine)."
        ),
    ] = None,
    python_version: Annotated[str, typer.Option(help="Target Python version (with --platform).")] = "3.11",
    torch_index: Annotated[str, typer.Option(help="Extra index for CPU torch builds ('' for none).")] = CPU_INDEX,
    task: Annotated[
        list[Path] | None, typer.Option("--task", help="An own task's wheel: its dependencies too (repeat it).")
    ] = None,
    he: Annotated[
        bool, typer.Option("--he", help="TenSEAL too: sites of runs with --secure-aggregation ckks need it.")
    ] = False,
) -> None:
    bundle = bundle_wheels(
        out_dir, role=role, platform=platform, python_version=python_version,
        torch_index=torch_index or None, tasks=task or [], he=he, report=info,
    )  # fmt: skip
    size = sum(w.stat().st_size for w in bundle.wheels) / 1e6
    out.print(f"{len(bundle.wheels)} wheels ({size:.0f} MB) in {out_dir}; see {out_dir / 'INSTALL.txt'}")
