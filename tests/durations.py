"""The suite's time budget, kept: every test's duration from the last whole run, and its slowest tests.

At the end of a pytest session (the controller, with pytest-xdist) the durations of every test that
ran (setup + call + teardown) are folded into ``docs/test-durations.json``; ``docs/test-durations.md``
lists the 20 slowest and the session's wall time. The JSON also orders the next session: the longest
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


def known() -> dict[str, float]:
    """Seconds per test node id from the last sessions (empty when none was kept)."""
    try:
        return {str(k): float(v) for k, v in json.loads(DATA.read_text("utf-8"))["tests"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _phases(seconds: dict[str, float], wall_s: float, workers: int, selection: str) -> tuple[dict[str, float], str]:
    """This pytest session's durations with those of the earlier phases of the same run of
    scripts/test.sh (``FLOWERBED_TEST_SESSION``), and the phases said in words."""
    session = os.environ.get("FLOWERBED_TEST_SESSION", "")
    said = f"{selection}, {len(seconds)} tests, {workers} worker(s), wall time {wall_s / 60:.1f} min"
    if not session:
        return seconds, said
    state = Path(tempfile.gettempdir()) / f"flowerbed-test-session-{session}.json"
    try:
        earlier = json.loads(state.read_text("utf-8"))
    except (OSError, ValueError):
        earlier = {"seconds": {}, "phases": [], "wall_s": 0.0}
    together = earlier["seconds"] | seconds
    phases = [*earlier["phases"], said]
    total = earlier["wall_s"] + wall_s
    state.write_text(json.dumps({"seconds": together, "phases": phases, "wall_s": total}), encoding="utf-8")
    return together, f"{len(together)} tests in {len(phases)} phase(s), wall time {total / 60:.1f} min: " + "; ".join(
        phases
    )


def keep(seconds: dict[str, float], wall_s: float, workers: int, selection: str) -> list[tuple[str, float]]:
    """Fold this session's durations into the JSON, write the page; returns the session's slowest tests.

    The phases of one run of scripts/test.sh (``FLOWERBED_TEST_SESSION``) make one page together.
    """
    data = known() | {k: round(v, 2) for k, v in seconds.items()}
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    DATA.write_text(json.dumps({"tests": dict(sorted(data.items()))}, indent=1) + "\n", encoding="utf-8")
    seconds, said = _phases(seconds, wall_s, workers, selection)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:SLOWEST]
    lines = [
        "# Test durations",
        "",
        "Written by the test suite at the end of each session (`tests/durations.py`); never by hand.",
        "",
        f"Last session: {when}, {said}, {os.cpu_count()} cores.",
        "",
        "| seconds | test |",
        "|---:|---|",
        *(f"| {s:.1f} | `{name}` |" for name, s in slowest),
        "",
    ]
    if len(seconds) >= WHOLE:  # a test or two run by hand leave the page of the last whole run
        PAGE.write_text("\n".join(lines), encoding="utf-8")
    return slowest
