"""``flowerbed certs``: CA, server certificate, node keys, and a table of what exists."""

from __future__ import annotations

from pathlib import Path

import typer

from flowerbed.certs import service
from flowerbed.config import load_federation
from flowerbed.console import err, info, out, table
from flowerbed.layout import FederationLayout
from flowerbed.options import FED_DIR

app = typer.Typer(help="Create and inspect the federation's CA, certificates and node keys.",
                  no_args_is_help=True)  # fmt: skip


@app.command("init", help="Create the federation CA once (an existing CA is kept).")
def init(
    fed_dir: Path = FED_DIR,
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (invalidates every kit)."),
) -> None:
    config = load_federation(fed_dir)
    path = service.init_ca(FederationLayout(fed_dir), config.name, force=force)
    out.print(f"created the federation CA: {path} (key 0600 next to it)")
    info(f"next: `flowerbed certs server -d {fed_dir}`")


@app.command("server", help="Issue the gateway/SuperLink certificate for every configured name.")
def server(fed_dir: Path = FED_DIR) -> None:
    config = load_federation(fed_dir)
    layout = FederationLayout(fed_dir)
    names = service.issue_server(layout, config)
    out.print(f"issued {layout.server_cert} for: {', '.join(names)}")


@app.command("node", help="Create a site's node key pair for SuperNode authentication.")
def node(
    site: str = typer.Argument(..., help="Site name from federation.toml."),
    fed_dir: Path = FED_DIR,
    force: bool = typer.Option(False, "--force", help="Replace the site's existing key."),
) -> None:
    config = load_federation(fed_dir)
    path = service.make_node_key(FederationLayout(fed_dir), config, site, force=force)
    out.print(f"created {path} (0600) and {path}.pub")


@app.command("show", help="Show certificates and node keys: SANs, fingerprints, expiry.")
def show(fed_dir: Path = FED_DIR) -> None:
    config = load_federation(fed_dir)
    rows = service.show(FederationLayout(fed_dir), config)
    out.print(
        table(
            "Federation PKI",
            ["kind", "subject", "SANs", "fingerprint", "not after", "days left", "warning"],
            (
                [r.kind, r.subject, ", ".join(r.sans), r.fingerprint,
                 r.not_after.date().isoformat() if r.not_after else None, r.days_left, r.warning]
                for r in rows
            ),
        )
    )  # fmt: skip
    for r in rows:
        if r.warning:
            err.print(
                f"[yellow]warning:[/] {r.kind} {r.path}: {r.warning}; run `flowerbed certs server`"
                if r.kind == "server"
                else f"[yellow]warning:[/] {r.kind} {r.path}: {r.warning}"
            )
