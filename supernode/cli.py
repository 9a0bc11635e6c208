"""``flowerbed supernode``: preflight, then a supervised outbound-only SuperNode."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from flowerbed.console import info, out, table
from flowerbed.supernode.preflight import require, run_preflight
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor

app = typer.Typer(help="Run this site's SuperNode (outbound only).", no_args_is_help=True)


@app.command("start", help="Check data, CA, key and the SuperLink, then run and supervise the SuperNode.")
def start(
    superlink: str = typer.Option(..., help="Gateway address HOST:PORT, e.g. link.example.org:9092."),
    ca: Path = typer.Option(..., help="Federation CA certificate (ca.crt from the kit)."),
    key: Path = typer.Option(..., help="This site's node private key (SITE.key from the kit)."),
    data: Path = typer.Option(..., help="Local data: a CSV file or a folder of class folders."),
    site: str | None = typer.Option(None, help="Site name (default: the key's file name)."),
    workdir: Path = typer.Option(Path("supernode-work"), help="Folder for logs and Flower state."),
    port: int = typer.Option(9094, help="Loopback port of the SuperNode's local API."),
    rejected_window_s: float = typer.Option(
        150, help="How long a refused node key is retried before giving up."
    ),
    preflight_only: bool = typer.Option(False, "--preflight-only", help="Only run the checks."),
) -> None:
    checks = run_preflight(superlink, ca, key, data)
    out.print(table("Preflight", ["check", "ok", "detail"],
                    ([c.name, "yes" if c.ok else "NO", c.detail] for c in checks)))  # fmt: skip
    require(checks)
    if preflight_only:
        return
    spec = SupernodeSpec(
        site=site or key.name.removesuffix(".key"),
        superlink=superlink,
        ca=ca,
        key=key,
        data=data,
        workdir=workdir,
        port=port,
    )
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Supervisor(spec, report=info, rejected_window_s=rejected_window_s).run(stop.is_set)
    info("SuperNode stopped")
