"""Benchmark: the demo federation's wall time, time per round and peak memory.

Runs `flowerbed.demo.run_demo` (the default demo: five TLS SuperNodes through the nginx gateway) REPEAT
times, prints a table and writes docs/benchmarks.md. Usage: python benchmarks/demo_rounds.py [REPEAT]
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flowerbed.demo import run_demo

OUT = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}"


def main() -> int:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    rows = []
    for i in range(repeat):
        marks: dict[str, float] = {}
        start = time.monotonic()

        def report(msg: str, marks: dict[str, float] = marks, start: float = start) -> None:
            if msg.startswith("starting the Fleet gateway"):
                marks["stack"] = time.monotonic() - start
            if msg.startswith("submitted run"):
                marks["submitted"] = time.monotonic() - start

        with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
            result = run_demo(Path(tmp), report=report)
        total = time.monotonic() - start
        seconds = [float(r["seconds"]) for r in result.run.rows]
        fed = next(c for c in result.comparisons if c.model.startswith("federated"))
        rows.append(
            {
                "run": i + 1,
                "total_s": total,
                "stack_ready_s": marks.get("stack", float("nan")),
                "rounds": len(seconds),
                "round_mean_s": statistics.mean(seconds),
                "round_max_s": max(seconds),
                "stop": result.run.summary.get("stop_reason"),
                "fed_acc": fed.accuracy,
            }
        )
    peak_child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    header = "| run | total s | stack ready s | rounds | mean s/round | max s/round | stop | federated acc |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['total_s']:.1f} | {r['stack_ready_s']:.1f} | {r['rounds']} | "
            f"{r['round_mean_s']:.1f} | {r['round_max_s']:.1f} | {r['stop']} | {r['fed_acc']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"peak RSS of the largest child process: {peak_child_mb:.0f} MB")
    OUT.write_text(
        "# Benchmarks\n\n"
        "## Demo federation (`python benchmarks/demo_rounds.py`)\n\n"
        f"Machine: {machine()}. The default demo: five TLS SuperNodes (digits images) with node auth through "
        "the nginx gateway on loopback, SQLite SuperLink state, torch CPU, 10 rounds.\n\n"
        f"{table}\n\nPeak RSS of the largest child process: {peak_child_mb:.0f} MB.\n\n"
        "Rounds move in steps of about 3 s set by Flower's own poll intervals, and every message "
        "starts a fresh `flwr-clientapp` process that imports torch, so a round of this tiny model "
        "costs 10-20 s on 2 cores whatever the model: flowerbed evaluates the received global "
        "model inside the train reply to need one exchange per round instead of two.\n",
        encoding="utf-8",
    )
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
