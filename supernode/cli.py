"""``flowerbed supernode``: preflight, then a supervised outbound-only SuperNode."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from flowerbed.console import info, out, table
from flowerbed.errors import FlowerbedError
from flowerbed.supernode.preflight import require, run_preflight
from flowerbed.supernode.sitekit import load_kit
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor

app = typer.Typer(help="Run this site's SuperNode (outbound only).", no_args_is_help=True)


def spec_from_options(
    kit_dir: Path | None,
    superlink: str | None,
    ca: Path | None,
    key: Path | None,
    data: Path | None,
    site: str | None,
    workdir: Path | None,
    port: int | None,
) -> SupernodeSpec:
    """A SupernodeSpec from a kit folder (options override it) or from the options alone."""
    if kit_dir is not None:
        kit = load_kit(kit_dir)
        return SupernodeSpec(
            site=site or kit.config.site,
            superlink=superlink or kit.config.superlink,
            ca=ca or kit.ca,
            key=key or kit.key,
            data=kit.data_path(data),
            workdir=workdir or kit.workdir,
            port=port or kit.config.supernode_port,
        )
    missing = [n for n, v in (("--superlink", superlink), ("--ca", ca), ("--key", key), ("--data", data)) if v is None]
    if missing:
        raise FlowerbedError(f"pass --kit KIT_FOLDER, or all of {', '.join(missing)}")
    assert superlink and ca and key and data  # noqa: S101 - narrowed by the check above
    return SupernodeSpec(
        site=site or key.name.removesuffix(".key"),
        superlink=superlink,
        ca=ca,
        key=key,
        data=data,
        workdir=workdir or Path("supernode-work"),
        port=port or 9094,
    )


@app.command("start", help="Check data, CA, key and the SuperLink, then run and supervise the SuperNode.")
def start(
    kit: Path | None = typer.Option(None, help="Unpacked site kit folder (holds site.toml)."),
    superlink: str | None = typer.Option(None, help="Gateway address HOST:PORT, e.g. link.example.org:9092."),
    ca: Path | None = typer.Option(None, help="Federation CA certificate (ca.crt from the kit)."),
    key: Path | None = typer.Option(None, help="This site's node private key (SITE.key from the kit)."),
    data: Path | None = typer.Option(None, help="Local data: a CSV file or a folder of class folders."),
    site: str | None = typer.Option(None, help="Site name (default: from the kit or the key's file name)."),
    workdir: Path | None = typer.Option(None, help="Folder for logs and Flower state."),
    port: int | None = typer.Option(None, help="Loopback port of the SuperNode's local API (9094)."),
    rejected_window_s: float = typer.Option(150, help="How long a refused node key is retried before giving up."),
    preflight_only: bool = typer.Option(False, "--preflight-only", help="Only run the checks."),
) -> None:
    spec = spec_from_options(kit, superlink, ca, key, data, site, workdir, port)
    checks = run_preflight(spec.superlink, spec.ca, spec.key, spec.data)
    out.print(table("Preflight", ["check", "ok", "detail"],
                    ([c.name, "yes" if c.ok else "NO", c.detail] for c in checks)))  # fmt: skip
    require(checks)
    if preflight_only:
        return
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Supervisor(spec, report=info, rejected_window_s=rejected_window_s).run(stop.is_set)
    info("SuperNode stopped")
