"""``flowerbed superlink``: start and supervise the coordinator's processes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.commands.common import FedDir, stop_on_signals
from flowerbed.config import load_federation, resolve
from flowerbed.console import info, out, warn
from flowerbed.diskspace import MB, device_of, free_bytes
from flowerbed.filemodes import exposure_warning
from flowerbed.keeper import RunKeeper
from flowerbed.layout import FederationLayout
from flowerbed.superlink.refusals import RefusalWatch
from flowerbed.superlink.stack import start_stack, supervise

LOW_SPACE = 200 * MB  # below it, `superlink start` warns
app = typer.Typer(help="Run the coordinator: SuperLink, ServerApp executor and Fleet gateway.",
                  no_args_is_help=True)  # fmt: skip


@app.command("start", help="Start SuperLink, executor and gateway; stop all on Ctrl-C/SIGTERM.")
def start(
    fed_dir: FedDir = Path(),
    gateway_host: Annotated[str | None, typer.Option(help="Listen address of the gateway.")] = None,
    port: Annotated[int | None, typer.Option(help="Public port of the gateway.")] = None,
    deadline_s: Annotated[float, typer.Option(help="Seconds each process may take to become ready.")] = 90,
    resume_runs: Annotated[
        bool,
        typer.Option(
            "--resume-runs/--no-resume-runs",
            help="Resume runs interrupted by a crash or restart from their last checkpoint.",
        ),
    ] = True,
) -> None:
    config = load_federation(fed_dir)
    config = resolve(config, {"superlink": resolve(config.superlink, {"gateway_host": gateway_host, "port": port})})
    stop = stop_on_signals()
    layout = FederationLayout(fed_dir)
    exposed = exposure_warning(layout.root)
    if exposed:
        warn(exposed)
    if free_bytes(layout.root) < LOW_SPACE:
        warn(f"only {free_bytes(layout.root) / MB:.1f} MB free on {device_of(layout.root)} ({layout.root}): runs "
             "write checkpoints, histories and the SuperLink's state there; a run that finds no space ends, "
             "said why")  # fmt: skip
    stack = start_stack(layout, config, deadline_s=deadline_s, report=info)
    try:
        sl = config.superlink
        out.print(
            f"federation {config.name} is up: gateway {sl.gateway_host}:{sl.port} (Fleet API only), "
            f"SuperLink 127.0.0.1:{sl.internal_port}; registered sites: {', '.join(stack.registered)}",
            markup=False,
        )
        out.print(f"logs: {layout.logs}; submit a run with `flowerbed run -d {fed_dir}`; Ctrl-C stops")
        keeper = RunKeeper(layout, info, enabled=resume_runs, control_port=sl.internal_port)
        keeper.tick(why="; the coordinator had stopped", startup=True)
        refusals = RefusalWatch(layout, layout.logs / "superlink.log")
        supervise(stack, should_stop=stop.is_set, report=info, on_idle=keeper.tick, refusals=refusals)
    finally:
        stack.stop()
        info("stopped SuperLink, executor and gateway")
