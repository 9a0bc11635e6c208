"""``flowerbed bundle``: offline install bundles for VMs without package access."""

from __future__ import annotations

from pathlib import Path

import typer

from flowerbed.console import info, out
from flowerbed.deploy.bundle import bundle_wheels
from flowerbed.deploy.condaenv import CPU_INDEX, parse_role

app = typer.Typer(help="Bundle everything a VM needs to install offline.", no_args_is_help=True)


@app.command("wheels", help="Download every wheel the SuperNode environment needs into one folder.")
def wheels(
    out_dir: Path = typer.Option(Path("wheels"), "--out", help="Folder to fill."),
    role: str = typer.Option("supernode-cpu", help="superlink, supernode-cpu or supernode-cuda."),
    platform: str | None = typer.Option(
        None, help="Target platform tag, e.g. manylinux2014_x86_64 or win_amd64 (default: this machine)."
    ),
    python_version: str = typer.Option("3.11", help="Target Python version (with --platform)."),
    torch_index: str = typer.Option(CPU_INDEX, help="Extra index for CPU torch builds ('' for none)."),
) -> None:
    bundle = bundle_wheels(
        out_dir, role=parse_role(role), platform=platform, python_version=python_version,
        torch_index=torch_index or None, report=info,
    )  # fmt: skip
    size = sum(w.stat().st_size for w in bundle.wheels) / 1e6
    out.print(f"{len(bundle.wheels)} wheels ({size:.0f} MB) in {out_dir}; see {out_dir / 'INSTALL.txt'}")
