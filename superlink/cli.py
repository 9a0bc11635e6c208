"""``flowerbed superlink``: start and supervise the coordinator's processes."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from flowerbed.config import load_federation
from flowerbed.console import info, out
from flowerbed.layout import FederationLayout
from flowerbed.options import FED_DIR
from flowerbed.superlink.stack import start_stack, supervise

app = typer.Typer(help="Run the coordinator: SuperLink, ServerApp executor and Fleet gateway.",
                  no_args_is_help=True)  # fmt: skip


@app.command("start", help="Start SuperLink, executor and gateway; stop all on Ctrl-C/SIGTERM.")
def start(
    fed_dir: Path = FED_DIR,
    gateway_host: str | None = typer.Option(None, help="Listen address of the gateway."),
    port: int | None = typer.Option(None, help="Public port of the gateway."),
    deadline_s: float = typer.Option(90, help="Seconds each process may take to become ready."),
) -> None:
    config = load_federation(fed_dir)
    if gateway_host is not None:
        config.superlink.gateway_host = gateway_host
    if port is not None:
        config.superlink.port = port
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    layout = FederationLayout(fed_dir)
    stack = start_stack(layout, config, deadline_s=deadline_s, report=info)
    try:
        sl = config.superlink
        out.print(
            f"federation {config.name} is up: gateway {sl.gateway_host}:{sl.port} (Fleet API only), "
            f"SuperLink 127.0.0.1:{sl.internal_port}; registered sites: {', '.join(stack.registered)}"
        )
        out.print(f"logs: {layout.logs}; submit a run with `flowerbed run -d {fed_dir}`; Ctrl-C stops")
        supervise(stack, should_stop=stop.is_set)
    finally:
        stack.stop()
        info("stopped SuperLink, executor and gateway")
