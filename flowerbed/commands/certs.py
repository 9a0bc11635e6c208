"""``flowerbed certs``: CA, server certificate, node keys, and a table of what exists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.certs import service
from flowerbed.commands.common import FedDir
from flowerbed.config import load_federation
from flowerbed.console import info, out, table, warn
from flowerbed.layout import FederationLayout
from flowerbed.superlink import sites

app = typer.Typer(help="Create and inspect the federation's CA, certificates and node keys.",
                  no_args_is_help=True)  # fmt: skip


@app.command("init", help="Create the federation CA once (an existing CA is kept).")
def init(
    fed_dir: FedDir = Path(),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CA (invalidates every kit).")] = False,
) -> None:
    config = load_federation(fed_dir)
    path = service.init_ca(FederationLayout(fed_dir), config.name, force=force)
    out.print(f"created the federation CA: {path} (key 0600 next to it)")
    info(f"next: `flowerbed certs server -d {fed_dir}`")


@app.command("server", help="Issue the gateway/SuperLink certificate for every configured name.")
def server(fed_dir: FedDir = Path()) -> None:
    config = load_federation(fed_dir)
    layout = FederationLayout(fed_dir)
    names = service.issue_server(layout, config)
    out.print(f"issued {layout.server_cert} for: {', '.join(names)}")


@app.command("node", help="Create a site's node key pair for SuperNode authentication.")
def node(
    site: Annotated[str, typer.Argument(help="Site name from federation.toml.")],
    fed_dir: FedDir = Path(),
    force: Annotated[bool, typer.Option("--force", help="Replace the site's existing key.")] = False,
) -> None:
    config = load_federation(fed_dir)
    path = service.make_node_key(FederationLayout(fed_dir), config, site, force=force)
    out.print(f"created {path} (0600) and {path}.pub")


@app.command("show", help="Show certificates and node keys: SANs, full SHA-256 fingerprints, expiry.")
def show(fed_dir: FedDir = Path()) -> None:
    config = load_federation(fed_dir)
    rows = service.show(FederationLayout(fed_dir), config)
    out.print(
        table(
            "Federation PKI",
            ["kind", "subject", "SANs", "not after", "days left", "warning"],
            (
                [r.kind, r.subject, ", ".join(r.sans),
                 r.not_after.date().isoformat() if r.not_after else None, r.days_left, r.warning]
                for r in rows
            ),
        )
    )  # fmt: skip
    # Whole fingerprints, one per line, never cut by the terminal's width: they are compared out of band.
    for r in rows:
        out.print(f"{r.kind} {r.path.name}: {r.fingerprint}", soft_wrap=True)
    for r in rows:
        if r.warning:
            fix = "; run `flowerbed certs renew-server`" if r.kind == "server" else ""
            warn(f"{r.kind} {r.path}: {r.warning}{fix}")


@app.command("revoke", help="Unregister a site's node key at once; it stays refused after restarts.")
def revoke(
    site: Annotated[str, typer.Argument(help="Site name.")],
    fed_dir: FedDir = Path(),
) -> None:
    node_id, now = sites.revoke_site(FederationLayout(fed_dir), site)
    if now:
        out.print(f"revoked {site}: the SuperLink refuses node {node_id} from now on; its key is in nodes/revoked/")
    else:
        out.print(f"revoked {site}: its key is in nodes/revoked/; the SuperLink unregisters it when it starts")


@app.command("renew-server", help="Re-issue the gateway certificate from the same CA; sites keep their kits.")
def renew_server(fed_dir: FedDir = Path()) -> None:
    config = load_federation(fed_dir)
    layout = FederationLayout(fed_dir)
    names, pid = service.renew_server(layout, config)
    out.print(f"issued {layout.server_cert} for: {', '.join(names)}")
    if pid is not None:
        out.print(f"the running gateway (pid {pid}) serves it now; the loopback SuperLink reads it at its next start")
    else:
        info("the coordinator is not running: `flowerbed superlink start` uses the new certificate")
