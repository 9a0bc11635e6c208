"""``flowerbed audit``: the coordinator's or a site's tamper-evident audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed import audit
from flowerbed.commands.common import FedDir
from flowerbed.console import out, table
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.supernode.approval import load_site, site_audit

app = typer.Typer(help="The audit trail: who connected, what ran, what left each site, certificates, approvals.")

Kit = Annotated[
    Path | None, typer.Option("--kit", help="A site's unpacked kit folder: its trail instead of the coordinator's.")
]


def trail(fed_dir: Path, kit: Path | None) -> Path:
    """The coordinator's trail (``FED/audit.jsonl``), or the site's with ``--kit``."""
    return site_audit(kit, load_site(kit)) if kit is not None else FederationLayout(fed_dir).audit


@app.command("verify", help="Check that no line of the trail was edited, removed or reordered (exit 1 if one was).")
def verify_cmd(fed_dir: FedDir = Path(), kit: Kit = None) -> None:
    path = trail(fed_dir, kit)
    verdict = audit.verify(path)
    if not verdict.intact:
        raise FlowerbedError(f"{verdict.describe()}; keep this file as evidence and compare it with a backup")
    broken = audit.check_anchors(path)
    if broken:
        raise FlowerbedError(f"{broken[0]} (the audit trail itself is intact); keep both files as evidence")
    events = audit.read(path)
    head = f"; head: event {events[-1]['seq']} {events[-1]['hash'][:16]}" if events else ""
    out.print(f"{verdict.describe()}{head}" + ("; anchored gateway logs unchanged" if kit is None else ""))


@app.command("show", help="The trail as a readable timeline (UTC).")
def show_cmd(
    fed_dir: FedDir = Path(),
    kit: Kit = None,
    kind: Annotated[
        str | None, typer.Option(help="Only this kind: connected, task, round, certificate, approval, run, gateway.")
    ] = None,
    last: Annotated[int | None, typer.Option(help="Only the last N events.")] = None,
) -> None:
    path = trail(fed_dir, kit)
    if not path.exists():
        raise FlowerbedError(f"{path} does not exist: no audit trail was written there yet")
    events = [e for e in audit.read(path) if kind is None or e.get("kind") == kind]
    if last is not None:
        events = events[-last:]
    rows = ([e["seq"], str(e["at"]).replace("T", " ").removesuffix("Z"), e["kind"], e["actor"], audit.summary(e)]
            for e in events)  # fmt: skip
    out.print(table(f"Audit trail {path}", ["#", "time (UTC)", "kind", "by", "what"], rows))
