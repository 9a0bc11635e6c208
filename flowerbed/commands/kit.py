"""``flowerbed kit``: per-site startup kits and service units."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from flowerbed import taskstore
from flowerbed.commands.common import FedDir
from flowerbed.config import load_federation
from flowerbed.console import info, out, table
from flowerbed.deploy.kit import build_kits, coordinator_unit
from flowerbed.layout import FederationLayout

app = typer.Typer(help="Build per-site startup kits and service units.", no_args_is_help=True)


@app.command("build", help="Write one startup kit per site into FEDERATION_DIR/kits/ (a folder and one archive).")
def build(
    fed_dir: FedDir = Path(),
    site: Annotated[list[str] | None, typer.Option("--site", help="Only these sites (repeat); default: all.")] = None,
    bundle: Annotated[
        list[Path] | None,
        typer.Option(
            help="An offline bundle (`flowerbed bundle wheels --out DIR`) for VMs without package access; "
            "one per system (repeat it): each kit gets its site's platform's."
        ),
    ] = None,
    wheel: Annotated[
        Path | None, typer.Option(help="The flowerbed wheel to ship (default: built from this installation).")
    ] = None,
    task: Annotated[
        list[Path] | None, typer.Option("--task", help="An own task's wheel to ship for approval (repeat it).")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace stored task wheels of the same name and version.")
    ] = False,
    archive_format: Annotated[
        str | None,
        typer.Option(
            "--format", help="tar.gz or zip for every kit (default: by each site's platform, zip on windows)."
        ),
    ] = None,
) -> None:
    config = load_federation(fed_dir)
    layout = FederationLayout(fed_dir)
    for path in task or []:  # another build of a stored task is refused before anything is built
        taskstore.check_new(layout, path, replace=replace)
    kits = build_kits(layout, config, site or None, wheel=wheel, bundles=bundle or [], tasks=task or [],
                      archive_format=archive_format, report=info)  # fmt: skip
    for path in task or []:  # the federation's runs name it: `flowerbed run --task NAME`
        taskstore.add(layout, path, replace=replace)
    out.print(
        table("Site kits", ["site", "folder", "archive", "MB"],
              ([k.site, k.folder, k.archive.name, f"{k.archive.stat().st_size / 1e6:.1f}"] for k in kits))
    )  # fmt: skip
    info("send each site only its own archive; it holds that site's private key")


@app.command("coordinator-unit", help="Print a systemd unit that runs `flowerbed superlink start`.")
def unit(
    fed_dir: FedDir = Path(),
    flowerbed: Annotated[str, typer.Option(help="Path of the flowerbed command (default: this one).")] = "",
) -> None:
    config = load_federation(fed_dir)
    exe = flowerbed or shutil.which("flowerbed") or "/usr/local/bin/flowerbed"
    typer.echo(coordinator_unit(config.name, str(fed_dir.resolve()), exe), nl=False)
