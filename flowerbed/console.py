"""Rendering shared by the CLI commands: one console, one way to show errors and tables."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# markup=False: messages quote outside text (Flower's errors, paths, TOML tables such as
# ``[tool.flwr.app]``) that rich would otherwise read as style tags and swallow; emoji=False: a
# fingerprint such as ``ab:cd:ef`` holds ``:cd:``, which rich would turn into an emoji.
# soft_wrap=True: a line is never folded by rich, so a long path or command stays one piece to copy
# (a narrow or unknown terminal width folded `logs: /long/path` in the middle of the path).
# Without a terminal (a pipe, a log file) there is no width to fit: tables are printed whole.
FILE_WIDTH = 10_000
out = Console(highlight=False, markup=False, emoji=False, soft_wrap=True,
              width=None if sys.stdout.isatty() else FILE_WIDTH)  # fmt: skip
err = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True,
              width=None if sys.stderr.isatty() else FILE_WIDTH)  # fmt: skip


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers rounded, None as a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table with formatted cells."""
    tab = Table(title=title, title_justify="left")
    for col in columns:
        tab.add_column(col)
    for row in rows:
        tab.add_row(*(fmt(v) for v in row))
    return tab


def error(message: str, details: Sequence[str] = ()) -> None:
    """``error: message`` in one line, then one bullet per detail (outside text is never markup)."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    for line in details:
        err.print(f"  • {line}", soft_wrap=True)


def warn(message: str) -> None:
    """``warning: message`` in one line."""
    err.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)


def info(message: str) -> None:
    """A progress line on stderr."""
    err.print(Text.assemble(("›", "dim"), " ", message), soft_wrap=True)
