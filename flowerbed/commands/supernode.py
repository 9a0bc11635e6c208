"""``flowerbed supernode``: preflight, then a supervised outbound-only SuperNode."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.commands.common import stop_on_signals
from flowerbed.console import info, out, table
from flowerbed.supernode.preflight import clock_probe, link_probe, require, run_preflight
from flowerbed.supernode.sitekit import site_spec
from flowerbed.supernode.supervisor import Supervisor

app = typer.Typer(help="Run this site's SuperNode (outbound only).", no_args_is_help=True)


@app.command("start", help="Check data, CA, key and the SuperLink, then run and supervise the SuperNode.")
def start(
    kit: Annotated[Path | None, typer.Option(help="Unpacked site kit folder (holds site.toml).")] = None,
    superlink: Annotated[
        str | None, typer.Option(help="Gateway address HOST:PORT, e.g. link.example.org:9092.")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="Federation CA certificate (ca.crt from the kit).")] = None,
    key: Annotated[Path | None, typer.Option(help="This site's node private key (SITE.key from the kit).")] = None,
    data: Annotated[Path | None, typer.Option(help="Local data: a CSV file or a folder of class folders.")] = None,
    site: Annotated[str | None, typer.Option(help="Site name (default: from the kit or the key's file name).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Folder for logs and Flower state.")] = None,
    port: Annotated[int | None, typer.Option(help="Loopback port of the SuperNode's local API (9094).")] = None,
    rejected_window_s: Annotated[
        float, typer.Option(help="How long a refused node key is retried before giving up.")
    ] = 150,
    preflight_only: Annotated[bool, typer.Option("--preflight-only", help="Only run the checks.")] = False,
) -> None:
    spec = site_spec(kit, superlink=superlink, ca=ca, key=key, data=data, site=site, workdir=workdir, port=port)
    checks = run_preflight(spec.superlink, spec.ca, spec.key, spec.data)
    out.print(table("Preflight", ["check", "ok", "detail"],
                    ([c.name, "yes" if c.ok else "NO", c.detail] for c in checks)))  # fmt: skip
    require(checks)
    if preflight_only:
        return
    stop = stop_on_signals()
    Supervisor(
        spec,
        report=info,
        rejected_window_s=rejected_window_s,
        link_probe=link_probe(spec),
        clock_probe=clock_probe(spec),
    ).run(stop.is_set)
    info("SuperNode stopped")
