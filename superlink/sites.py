"""The coordinator's view of its sites, and their life cycle while the federation runs.

``superlink/sites.json`` remembers which Flower node id each site's key was registered as (Flower
returns it at registration and never names the key again) and which sites were revoked. A revoked
site's key is unregistered at once, moved to ``nodes/revoked/`` and never registered again, so it
stays refused across restarts.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowerbed import audit
from flowerbed.certs import service
from flowerbed.config import (
    ConfigError,
    FederationConfig,
    Site,
    format_validation_error,
    load_federation,
    save_toml_model,
)
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import tcp_open
from flowerbed.runfolder import read_rows
from flowerbed.superlink import control, flwrcli


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def registry_path(layout: FederationLayout) -> Path:
    """Where the coordinator keeps the sites registry (``superlink/sites.json``)."""
    return layout.state / "sites.json"


def load_registry(layout: FederationLayout) -> dict[str, dict[str, Any]]:
    """The sites registry: site name -> its record (empty when none was written)."""
    path = registry_path(layout)
    if not path.is_file():
        return {}
    data: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return data


def save_registry(layout: FederationLayout, registry: dict[str, dict[str, Any]]) -> None:
    """Write the sites registry whole (a crash leaves the old one)."""
    path = registry_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def running(layout: FederationLayout, config: FederationConfig) -> bool:
    """True when this federation's SuperLink answers on its loopback port."""
    return (layout.flwr_home / "config.toml").is_file() and tcp_open("127.0.0.1", config.superlink.internal_port)


def register(layout: FederationLayout, site: str) -> str | None:
    """Register ``site``'s public key with the running SuperLink; its node id (None if known already)."""
    node_id = control.register_node(layout.flwr_home, layout.node_pub(site), site)
    if node_id is not None:
        registry = load_registry(layout)
        registry[site] = {"node_id": node_id, "registered_at": _now(), "revoked": False}
        save_registry(layout, registry)
        audit.append(layout.audit, audit.CERT, "coordinator", event="node key registered", site=site, node_id=node_id)
    return node_id


@dataclass(frozen=True)
class SiteStatus:
    """One row of ``flowerbed sites``."""

    site: str
    node_id: str | None
    status: str  # online, offline, registered, revoked, no key, not registered, coordinator stopped
    last_seen: str | None
    runs: list[str] = field(default_factory=list)


def _runs_by_site(layout: FederationLayout) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    if not layout.runs.is_dir():
        return found
    for run_dir in sorted(p for p in layout.runs.iterdir() if p.is_dir()):
        names = {name for row in read_rows(run_dir) for name in row.get("sites", [])}
        for name in names:
            found.setdefault(name, []).append(run_dir.name)
    return found


def statuses(layout: FederationLayout, config: FederationConfig) -> list[SiteStatus]:
    """Every site: node id, connected or not, last seen, and the runs it took part in."""
    registry = load_registry(layout)
    nodes: dict[str, dict[str, Any]] = {}
    up = running(layout, config)
    if up:
        nodes = {str(n.get("node-id")): n for n in flwrcli.list_nodes(layout.flwr_home)}
    runs = _runs_by_site(layout)
    names = [s.name for s in config.sites] + sorted(n for n in registry if n not in {s.name for s in config.sites})
    out = []
    for name in names:
        entry = registry.get(name, {})
        node_id = entry.get("node_id")
        node = nodes.get(str(node_id)) if node_id else None
        if entry.get("revoked"):
            status, seen = "revoked", entry.get("revoked_at")
        elif not layout.node_pub(name).is_file():
            status, seen = "no key", None
        elif not up:
            status, seen = "coordinator stopped", None
        elif node is None:
            status, seen = "not registered", None
        else:
            status = str(node.get("status"))
            seen = node.get("online-at") if status == "online" else node.get("offline-at")
            seen = seen or None
        out.append(SiteStatus(name, node_id, status, seen, runs.get(name, [])))
    return out


def expiry_warnings(layout: FederationLayout) -> list[str]:
    """A line for every certificate that expires within 30 days (or has expired)."""
    lines = []
    for kind, path in (("CA", layout.ca_cert), ("server", layout.server_cert)):
        if not path.is_file():
            continue
        info = service.cert_info(kind, path)
        if info.warning:  # the same 30-day rule as `flowerbed certs show`
            fix = "`flowerbed certs renew-server`" if kind == "server" else "a new CA and new kits for every site"
            when = "has expired" if info.warning == "EXPIRED" else info.warning
            lines.append(f"the {kind} certificate {path} {when}: {fix}")
    return lines


def add_site(layout: FederationLayout, name: str, platform: str = "linux") -> tuple[FederationConfig, str | None]:
    """Add a site to federation.toml, make its key, and register it with a running SuperLink.

    Returns the new config and the node id (None when the coordinator is not running: it is then
    registered at the next `flowerbed superlink start`). Build its kit with `flowerbed kit build --site`.
    """
    config = load_federation(layout.root)
    if name in {s.name for s in config.sites}:
        raise FlowerbedError(
            f"site {name!r} is already in {layout.config}: build its kit with `flowerbed kit build --site {name}`"
        )
    if load_registry(layout).get(name, {}).get("revoked"):
        raise FlowerbedError(f"site {name!r} was revoked; its name cannot be reused: choose another name")
    try:
        site = Site.model_validate({"name": name, "platform": platform})
    except ValidationError as exc:
        raise ConfigError(f"cannot add site {name!r}", format_validation_error("site", exc)) from None
    config = config.model_copy(update={"sites": [*config.sites, site]})  # [run] keeps what it gave, no more
    save_toml_model(layout.config, config)
    if not layout.node_key(name).exists():
        service.make_node_key(layout, config, name)
    node_id = register(layout, name) if running(layout, config) else None
    return config, node_id


def revoke_site(layout: FederationLayout, name: str) -> tuple[str | None, bool]:
    """Unregister ``name`` at once and keep it refused: its key leaves nodes/, the registry says revoked.

    Returns (node id, whether the running SuperLink unregistered it now).
    """
    config = load_federation(layout.root)
    registry = load_registry(layout)
    entry = registry.get(name)
    known = name in {s.name for s in config.sites}
    if not known and entry is None:
        raise FlowerbedError(f"unknown site {name!r}: the federation lists {', '.join(s.name for s in config.sites)}")
    if entry is not None and entry.get("revoked"):
        raise FlowerbedError(f"site {name!r} is already revoked")
    if known and len(config.sites) == 1:
        raise FlowerbedError(f"{name} is the federation's only site: add another (`flowerbed sites add NAME`) first")
    node_id = entry.get("node_id") if entry else None
    now_done = False
    if running(layout, config):
        if node_id is None:
            raise FlowerbedError(
                f"the SuperLink registered {name}'s key before flowerbed kept node ids: "
                f"find it with `flwr supernode ls` and unregister it with `flwr supernode unregister ID`"
            )
        # Recorded first: a round waiting for this node reads the registry and names it revoked.
        registry[name] = {**(entry or {}), "node_id": node_id, "revoked": True, "revoked_at": _now(),
                          "pending_unregister": True}  # fmt: skip
        save_registry(layout, registry)
        control.unregister_node(layout.flwr_home, int(node_id))
        now_done = True
    revoked_dir = layout.nodes / "revoked"
    revoked_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in (layout.node_key(name), layout.node_pub(name)):
        if path.exists():
            shutil.move(str(path), revoked_dir / f"{stamp}-{path.name}")
    registry[name] = {**(entry or {}), **registry.get(name, {}), "node_id": node_id, "revoked": True,
                      "revoked_at": registry.get(name, {}).get("revoked_at") or _now(),
                      "pending_unregister": not now_done}  # fmt: skip
    save_registry(layout, registry)
    audit.append(layout.audit, audit.CERT, "coordinator", event="site revoked", site=name, node_id=node_id,
                 unregistered_now=now_done)  # fmt: skip
    if known:
        sites = [s for s in config.sites if s.name != name]
        run = config.run.model_copy(update={"min_nodes": min(config.run.min_nodes, len(sites))})
        save_toml_model(layout.config, config.model_copy(update={"sites": sites, "run": run}))
    return node_id, now_done


def unregister_pending(layout: FederationLayout) -> list[str]:
    """Unregister sites revoked while the SuperLink was stopped (called right after it starts)."""
    registry = load_registry(layout)
    done = []
    for name, entry in registry.items():
        if entry.get("revoked") and entry.get("pending_unregister") and entry.get("node_id"):
            control.unregister_node(layout.flwr_home, int(entry["node_id"]))
            entry["pending_unregister"] = False
            done.append(name)
    if done:
        save_registry(layout, registry)
    return done
