"""``flowerbed sites``: the coordinator's sites (connected or not, node id, last seen, runs), and adding one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from flowerbed.commands.common import FedDir
from flowerbed.config import load_federation
from flowerbed.console import info, out, table, warn
from flowerbed.deploy.kit import build_kits
from flowerbed.layout import FederationLayout
from flowerbed.superlink import sites

app = typer.Typer(help="The federation's sites: who is connected, and adding a site while it runs.")


@app.callback(invoke_without_command=True)
def overview(ctx: typer.Context, fed_dir: FedDir = Path()) -> None:
    """Each site: connected or not, its node id, last seen, and the runs it took part in."""
    if ctx.invoked_subcommand is not None:
        return
    layout = FederationLayout(fed_dir)
    config = load_federation(fed_dir)
    rows = sites.statuses(layout, config)
    out.print(
        table(f"Sites of {config.name}", ["site", "status", "node id", "since", "runs"],
              ([r.site, r.status, r.node_id, r.last_seen, ", ".join(r.runs) or None] for r in rows))
    )  # fmt: skip
    for line in sites.expiry_warnings(layout):
        warn(line)


@app.command("add", help="Add a site: its key, its kit, and its registration with a running SuperLink.")
def add(
    name: Annotated[str, typer.Argument(help="New site name (lower-case letters, digits, hyphens).")],
    fed_dir: FedDir = Path(),
    platform: Annotated[
        str,
        typer.Option(
            help="The site VM's system (its kit is a .zip on windows).",
            click_type=click.Choice(["linux", "windows", "macos"]),
        ),
    ] = "linux",
) -> None:
    layout = FederationLayout(fed_dir)
    config, node_id = sites.add_site(layout, name, platform)
    kit = build_kits(layout, config, [name], report=info)[0]
    if node_id is not None:
        out.print(f"added {name}: registered as node {node_id} with the running SuperLink; kit: {kit.archive}")
    else:
        out.print(f"added {name}: kit {kit.archive}; `flowerbed superlink start` registers it")
    info("send the site only its own archive; it holds the site's private key")
