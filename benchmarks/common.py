"""What every benchmark shares: the machine and versions, one table printed, JSON + PNG under docs/benchmarks/."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
T = TypeVar("T")


def sampled(run: Callable[[], T], sample: Callable[[], None], every_s: float) -> T:
    """``run()``, with ``sample()`` called every ``every_s`` seconds in a thread until it returns."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            sample()

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    try:
        return run()
    finally:
        stop.set()
        sampler.join(timeout=10)


def _end_on_sigterm(_signum: int, _frame: object) -> None:
    sys.exit(143)  # SystemExit: every federation's `finally` stops its processes by pid


signal.signal(signal.SIGTERM, _end_on_sigterm)  # `kill PID` of a benchmark must not orphan its SuperLink
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # a log keeps whole headers


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("flowerbed", "flwr", "torch", "grpcio", "cryptography")},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _version(name: str) -> str:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return "-"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def show(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def write(
    name: str,
    out: Path,
    data: dict[str, Any],
    plot: Callable[[Any], None] | None = None,
) -> tuple[Path, Path | None]:
    """``out/NAME.json`` (with machine, versions, date and the command) and ``out/NAME.png`` from ``plot(axes)``."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": " ".join(["python -m", f"benchmarks.{name}", *sys.argv[1:]]),
            "machine": machine(), **data}  # fmt: skip
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    png = None
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(figsize=(7, 4))
        plot(axes)
        m = data["machine"]
        fig.text(0.01, 0.01, f"{m['cores']} cores, {m['memory_gib']} GiB, flwr {m['versions']['flwr']}, {m['date']}",
                 fontsize=7, color="gray")  # fmt: skip
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        png = out / f"{name}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
    console.print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return json_path, png


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def tree(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants (from /proc)."""
    children, seen, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def rss_mb(pids: list[int]) -> float:
    """Memory of processes and their descendants, MB: proportional set size (a page shared by a fork and
    its parent counts half in each), resident size where /proc has no smaps_rollup."""
    total = 0
    for pid in tree(pids):
        for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                lines = Path(path).read_text().splitlines()
            except OSError:
                continue
            found = [int(line.split()[1]) for line in lines if line.startswith(key)]
            if found:
                total += found[0]
                break
    return total / 1024


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by processes and their live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # incl. reaped children
    return total / tick
