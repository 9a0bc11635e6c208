"""``flowerbed init``: write a validated federation.toml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from flowerbed.config import (
    FEDERATION_FILE,
    IMAGE_KEYS,
    TABULAR_KEYS,
    ConfigError,
    FederationConfig,
    RunSettings,
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


INIT_LOOP_KEYS = ("max_rounds", "min_nodes", "patience", "time_budget_s", "round_timeout_s")


def initial_run(task: str, sites: int) -> dict[str, Any]:
    """The [run] table `init` writes: the loop's main settings, and the keys the chosen task uses (a
    built-in task's; an own task's come from its own defaults, so none are written)."""
    defaults = RunSettings.model_validate({}).model_dump()
    run = {key: defaults[key] for key in INIT_LOOP_KEYS} | {"min_nodes": min(2, max(1, sites))}
    if task == "tabular":
        return {"task": task} | run | {key: defaults[key] for key in TABULAR_KEYS}
    if task == "images":
        return {"task": task} | run | {key: defaults[key] for key in IMAGE_KEYS} | {"model": "cnn"}
    return {"task": task} | run


def create_federation(
    fed_dir: Path,
    *,
    name: str,
    address: str,
    sans: list[str],
    sites: list[str],
    port: int,
    task: str = "tabular",
    ports: dict[str, int | None] | None = None,
    gateway_host: str | None = None,
    force: bool = False,
) -> Path:
    """Validate the inputs and write FED_DIR/federation.toml.

    ``ports``: ``internal_port``, ``health_port``, ``executor_health_port`` and ``supernode_port``;
    one not given follows ``port`` (``port`` + 1, + 3, + 4, + 2: 9093, 9095, 9096, 9094 by default),
    so that a second federation on one host needs only another ``--port``.
    """
    path = fed_dir / FEDERATION_FILE
    if path.exists() and not force:
        raise FlowerbedError(f"{path} already exists: edit it, or pass --force to replace it")
    given = {key: value for key, value in (ports or {}).items() if value is not None}
    every = {key: port + step for key, step in PORT_STEPS.items()} | given
    link = {"address": address, "sans": sans, "port": port} | {k: v for k, v in every.items() if k != "supernode_port"}
    try:
        config = FederationConfig.model_validate(
            {
                "name": name,
                "supernode_port": every["supernode_port"],
                "superlink": link | ({"gateway_host": gateway_host} if gateway_host else {}),
                "sites": [{"name": s} for s in sites],
                "run": initial_run(task, len(sites)),
            }
        )
    except ValidationError as exc:
        details = format_validation_error("options", exc)
        raise ConfigError(f"cannot create {path} ({len(details)} problem(s))", details) from None
    fed_dir.mkdir(parents=True, exist_ok=True)
    save_toml_model(path, config)
    return path


PORT_STEPS = {"internal_port": 1, "supernode_port": 2, "health_port": 3, "executor_health_port": 4}


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
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="The task [run] is written for: tabular, images, or an own task's name (its defaults then hold).",
        ),
    ] = "tabular",
    port: Annotated[int, typer.Option("--port", help="Public port of the Fleet gateway; other ports follow.")] = 9092,
    gateway_host: Annotated[
        str | None, typer.Option("--gateway-host", help="Address the gateway listens on (default 0.0.0.0).")
    ] = None,
    internal_port: Annotated[
        int | None, typer.Option("--internal-port", help="SuperLink's loopback port [PORT+1].")
    ] = None,
    supernode_port: Annotated[
        int | None, typer.Option("--supernode-port", help="Sites' SuperNode port [PORT+2].")
    ] = None,
    health_port: Annotated[int | None, typer.Option("--health-port", help="SuperLink's health port [PORT+3].")] = None,
    executor_health_port: Annotated[
        int | None,
        typer.Option("--executor-health-port", help="ServerApp executor's health port [PORT+4]."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing federation.toml.")] = False,
) -> None:
    """Write a validated federation.toml (every port and address set) for the chosen task."""
    ports = {"internal_port": internal_port, "supernode_port": supernode_port, "health_port": health_port,
             "executor_health_port": executor_health_port}  # fmt: skip
    path = create_federation(
        fed_dir,
        name=name or default_name(fed_dir),
        address=superlink_address,
        sans=san or [],
        sites=site,
        port=port,
        task=task,
        ports=ports,
        gateway_host=gateway_host,
        force=force,
    )
    out.print(f"wrote {path}")
    info(f"next: `flowerbed certs init -d {fed_dir}`")
