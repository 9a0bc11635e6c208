"""``flowerbed init``: write a validated federation.toml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from flowerbed.config import (
    FEDERATION_FILE,
    ConfigError,
    FederationConfig,
    format_validation_error,
    save_toml_model,
)
from flowerbed.console import info, out
from flowerbed.errors import FlowerbedError

HELP = "Create a federation folder with a validated federation.toml."


def default_name(fed_dir: Path) -> str:
    """The folder's name made into a valid federation name (``My_Fed`` -> ``my-fed``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", fed_dir.resolve().name.lower()).strip("-")
    return name[:63] or "federation"


def create_federation(
    fed_dir: Path,
    *,
    name: str,
    address: str,
    sans: list[str],
    sites: list[str],
    port: int,
    force: bool = False,
) -> Path:
    """Validate the inputs and write FED_DIR/federation.toml."""
    path = fed_dir / FEDERATION_FILE
    if path.exists() and not force:
        raise FlowerbedError(f"{path} already exists: edit it, or pass --force to replace it")
    try:
        config = FederationConfig.model_validate(
            {
                "name": name,
                "superlink": {"address": address, "sans": sans, "port": port},
                "sites": [{"name": s} for s in sites],
                "run": {"min_nodes": min(2, max(1, len(sites)))},
            }
        )
    except ValidationError as exc:
        details = format_validation_error("options", exc)
        raise ConfigError(f"cannot create {path} ({len(details)} problem(s))", details) from None
    fed_dir.mkdir(parents=True, exist_ok=True)
    save_toml_model(path, config)
    return path


def init(
    fed_dir: Annotated[Path, typer.Argument(help="Folder to create the federation in.", file_okay=False)],
    superlink_address: Annotated[
        str, typer.Option("--superlink-address", help="Public DNS name or IP the SuperNodes connect to.")
    ],
    site: Annotated[list[str], typer.Option("--site", help="Participating site name (repeat).")],
    san: Annotated[
        list[str] | None, typer.Option("--san", help="Extra name or IP for the certificate (repeat).")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Federation name (default: the folder's name).")] = "",
    port: Annotated[int, typer.Option("--port", help="Public port of the Fleet gateway.")] = 9092,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing federation.toml.")] = False,
) -> None:
    path = create_federation(
        fed_dir,
        name=name or default_name(fed_dir),
        address=superlink_address,
        sans=san or [],
        sites=site,
        port=port,
        force=force,
    )
    out.print(f"wrote {path}")
    info(f"next: `flowerbed certs init -d {fed_dir}`")
