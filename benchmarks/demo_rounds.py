"""The demo federation's wall time, time per round and memory: ``flowerbed demo`` as a user runs it.

Runs :func:`flowerbed.demo.run_demo` (five TLS SuperNodes with digit images through the nginx gateway)
REPEAT times; prints a table, writes docs/benchmarks/demo_rounds.json and .png.

    python -m benchmarks.demo_rounds [--repeat 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, median, show, write
from flowerbed.demo import run_demo


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = []
    for i in range(args.repeat):
        marks: dict[str, float] = {}
        start = time.monotonic()

        def report(msg: str, marks: dict[str, float] = marks, start: float = start) -> None:
            if msg.startswith("submitted run"):
                marks["submitted"] = time.monotonic() - start

        with tempfile.TemporaryDirectory(prefix="fb-bench-demo-") as tmp:
            result = run_demo(Path(tmp), report=report)
        seconds = [float(r["seconds"]) for r in result.run.rows if r["kind"] == "train"]
        fed = next(c for c in result.comparisons if c.model.startswith("federated"))
        rows.append({"run": i + 1, "total_s": time.monotonic() - start, "until_submitted_s": marks.get("submitted"),
                     "rounds": len(seconds), "round_median_s": median(seconds), "round_max_s": max(seconds),
                     "stop": result.run.summary.get("stop_reason"), "federated_accuracy": fed.accuracy})  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    show("The demo (5 sites, digits)", ["run", "total s", "set up s", "rounds", "median s/round", "max s/round",
         "stop", "federated accuracy"],
         [[r["run"], r["total_s"], r["until_submitted_s"], r["rounds"], r["round_median_s"], r["round_max_s"],
           r["stop"], r["federated_accuracy"]] for r in rows])  # fmt: skip

    def plot(ax: Any) -> None:
        ax.bar([str(r["run"]) for r in rows], [r["total_s"] for r in rows])
        ax.set_xlabel("run")
        ax.set_ylabel("seconds, whole demo")
        ax.set_title("flowerbed demo")

    result_data = {"rows": rows, "peak_child_rss_mb": peak_mb}
    write("demo_rounds", args.out, result_data, plot)
    return result_data


if __name__ == "__main__":
    main()
