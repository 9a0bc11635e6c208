"""The suite's time budget, kept: every test's duration from the last whole run, and its slowest tests.

At the end of a pytest session (the controller, with pytest-xdist) the durations of every test that
ran (setup + call + teardown) are folded into ``docs/test-durations.json``; ``docs/test-durations.md``
lists the 20 slowest and the session's wall time. Beside each duration goes the CPU the test used (its
worker's and every process it started, user + system: ``cpu_spent``), the suite's real budget on a
machine of two cores. The JSON also orders the next session: the longest
tests start first, so that with concurrent workers the suite ends close to its longest test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "test-durations.json"
PAGE = ROOT / "docs" / "test-durations.md"
SLOWEST = 20
WHOLE = 60  # tests: a session this big (the suite or its quick lane) rewrites the page


def _kept(key: str) -> dict[str, float]:
    """One table of the JSON, per test node id (empty when none was kept)."""
    try:
        return {str(k): float(v) for k, v in json.loads(DATA.read_text("utf-8"))[key].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def known() -> dict[str, float]:
    """Seconds per test node id from the last sessions (empty when none was kept)."""
    return _kept("tests")


def known_cpu() -> dict[str, float]:
    """CPU seconds per test node id from the last sessions (empty when none was kept)."""
    return _kept("cpu")


CpuMark = tuple[float, dict[int, float]]


def cpu_mark(below: dict[int, float]) -> CpuMark:
    """This process's CPU seconds so far (with the children it reaped) and ``below``, the live processes
    under it with theirs (tests/procs.cpu_below)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system, below


def cpu_spent(start: CpuMark, end: CpuMark) -> float:
    """CPU seconds between two marks: this process and its reaped children, plus what the live processes
    below it used; a process alive at the start and reaped since counts from the start only."""
    (own0, live0), (own1, live1) = start, end
    spent = own1 - own0
    spent += sum(cpu - live0.get(pid, 0.0) for pid, cpu in live1.items())
    spent -= sum(cpu for pid, cpu in live0.items() if pid not in live1)
    return max(spent, 0.0)


def _phases(
    seconds: dict[str, float], cpu: dict[str, float], wall_s: float, workers: int, selection: str
) -> tuple[dict[str, float], dict[str, float], str]:
    """This pytest session's durations and CPU with those of the earlier phases of the same run of
    scripts/test.sh (``FLOWERBED_TEST_SESSION``), and the phases said in words."""
    session = os.environ.get("FLOWERBED_TEST_SESSION", "")
    said = f"{selection}, {len(seconds)} tests, {workers} worker(s), wall time {wall_s / 60:.1f} min"
    if not session:
        return seconds, cpu, said
    state = Path(tempfile.gettempdir()) / f"flowerbed-test-session-{session}.json"
    try:
        earlier = json.loads(state.read_text("utf-8"))
    except (OSError, ValueError):
        earlier = {"seconds": {}, "phases": [], "wall_s": 0.0}
    together = earlier["seconds"] | seconds
    cpu = earlier.get("cpu", {}) | cpu
    phases = [*earlier["phases"], said]
    total = earlier["wall_s"] + wall_s
    state.write_text(json.dumps({"seconds": together, "cpu": cpu, "phases": phases, "wall_s": total}), encoding="utf-8")
    words = f"{len(together)} tests in {len(phases)} phase(s), wall time {total / 60:.1f} min: " + "; ".join(phases)
    return together, cpu, words


def keep(
    seconds: dict[str, float], wall_s: float, workers: int, selection: str, cpu: dict[str, float] | None = None
) -> list[tuple[str, float]]:
    """Fold this session's durations (and CPU seconds) into the JSON, write the page; returns the
    session's slowest tests.

    The phases of one run of scripts/test.sh (``FLOWERBED_TEST_SESSION``) make one page together.
    """
    cpu = cpu or {}
    data = known() | {k: round(v, 2) for k, v in seconds.items()}
    cpu_data = known_cpu() | {k: round(v, 2) for k, v in cpu.items()}
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    DATA.write_text(
        json.dumps({"tests": dict(sorted(data.items())), "cpu": dict(sorted(cpu_data.items()))}, indent=1) + "\n",
        encoding="utf-8",
    )
    seconds, cpu, said = _phases(seconds, cpu, wall_s, workers, selection)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:SLOWEST]
    hungriest = sorted(cpu.items(), key=lambda kv: -kv[1])[:SLOWEST]
    lines = [
        "# Test durations",
        "",
        "Written by the test suite at the end of each session (`tests/durations.py`); never by hand.",
        "",
        f"Last session: {when}, {said}, {os.cpu_count()} cores.",
        f"CPU used by the tests' processes (user + system): {sum(cpu.values()) / 60:.1f} min.",
        "",
        "## The slowest tests",
        "",
        "| seconds | CPU s | test |",
        "|---:|---:|---|",
        *(f"| {s:.1f} | {cpu.get(name, float('nan')):.1f} | `{name}` |" for name, s in slowest),
        "",
        "## The tests that use the most CPU",
        "",
        "| CPU s | seconds | test |",
        "|---:|---:|---|",
        *(f"| {c:.1f} | {seconds.get(name, float('nan')):.1f} | `{name}` |" for name, c in hungriest),
        "",
    ]
    if len(seconds) >= WHOLE:  # a test or two run by hand leave the page of the last whole run
        PAGE.write_text("\n".join(lines), encoding="utf-8")
    return slowest
