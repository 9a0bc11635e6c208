"""Options shared by several command groups (typer ``Annotated`` style)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

FedDir = Annotated[
    Path,
    typer.Option(
        "--dir", "-d", envvar="FLOWERBED_DIR", file_okay=False,
        help="Federation folder (holds federation.toml); relative paths are fine.",
    ),
]  # fmt: skip


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for the commands that supervise processes."""
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
