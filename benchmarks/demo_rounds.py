"""The demo federation's wall time, time per round and memory: ``flowerbed demo`` as a user runs it.

Runs :func:`flowerbed.demo.run_demo` (five TLS SuperNodes with digit images through the nginx gateway)
REPEAT times, then plain Flower 1.42 with the same node count, task, recipe and data (``flower-superlink``
and five ``flower-supernode --insecure``, Flower's FedAvg, PLAIN_ROUNDS rounds): the ratio of the demo's
steady round to plain Flower's (bar D1, target <= 0.25; round 1 left out on both sides). Prints the
tables, writes docs/benchmarks/demo_rounds.json and .png.

    python -m benchmarks.demo_rounds [--repeat 1] [--plain-rounds 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write
from flowerbed.demo import SITES, run_demo
from flowerbed.demodata import make_digits_data

D1_TARGET = 0.25


def plain_rounds(rounds: int) -> list[float]:
    """Plain Flower's round seconds on the demo: five nodes, the digits recipe, ``rounds`` rounds (no early stop)."""
    sites = SITES["digits"]
    with tempfile.TemporaryDirectory(prefix="fb-bench-demo-plain-") as tmp:
        root = Path(tmp)
        data = make_digits_data(root / "site-data", sites)
        with fed.plain(root / "plain", data, sites=len(sites)) as plain:
            return plain.run(fed.recipe("digits", rounds), "demo-plain")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--plain-rounds", type=int, default=6, help="plain Flower's rounds for bar D1 (0: skip it)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for i in range(args.repeat):
        marks: dict[str, float] = {}
        start = time.monotonic()

        def report(msg: str, marks: dict[str, float] = marks, start: float = start) -> None:
            if msg.startswith("submitted run"):
                marks["submitted"] = time.monotonic() - start

        with tempfile.TemporaryDirectory(prefix="fb-bench-demo-") as tmp:
            result = run_demo(Path(tmp), report=report)
        seconds = [float(r["seconds"]) for r in result.run.rows if r["kind"] == "train"]
        federated = next(c for c in result.comparisons if c.model.startswith("federated"))
        rows.append({"run": i + 1, "total_s": time.monotonic() - start, "until_submitted_s": marks.get("submitted"),
                     "rounds": len(seconds), "round_median_s": median(seconds), "round_max_s": max(seconds),
                     "steady_round_s": median(seconds[1:] or seconds), "stop": result.run.summary.get("stop_reason"),
                     "federated_accuracy": federated.accuracy})  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    show("The demo (5 sites, digits)", ["run", "total s", "set up s", "rounds", "median s/round", "max s/round",
         "stop", "federated accuracy"],
         [[r["run"], r["total_s"], r["until_submitted_s"], r["rounds"], r["round_median_s"], r["round_max_s"],
           r["stop"], r["federated_accuracy"]] for r in rows])  # fmt: skip

    d1: dict[str, Any] = {}
    if args.plain_rounds:
        plain = plain_rounds(args.plain_rounds)
        kit_s, plain_s = median([r["steady_round_s"] for r in rows]), median(plain[1:] or plain)
        d1 = {"nodes": len(SITES["digits"]), "kit_round_s": kit_s, "plain_round_s": plain_s,
              "plain_rounds_s": plain, "ratio": kit_s / plain_s, "target": D1_TARGET}  # fmt: skip
        show(
            "Bar D1: the demo's steady round against plain Flower 1.42's, same nodes, task and data",
            ["nodes", "kit s/round", "plain Flower s/round", "ratio", "target", "met"],
            [[d1["nodes"], kit_s, plain_s, d1["ratio"], D1_TARGET, "yes" if d1["ratio"] <= D1_TARGET else "no"]],
        )

    def plot(ax: Any) -> None:
        labels = [f"demo, run {r['run']}" for r in rows] + (["plain Flower"] if d1 else [])
        ax.bar(labels, [r["steady_round_s"] for r in rows] + ([d1["plain_round_s"]] if d1 else []))
        if d1:
            ax.axhline(D1_TARGET * d1["plain_round_s"], color="red", linestyle="--", linewidth=1,
                       label=f"{D1_TARGET} x plain Flower")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_ylabel("seconds per steady round")
        ax.set_title("The demo (5 sites, digits)")

    result_data = {"rows": rows, "peak_child_rss_mb": peak_mb, "d1": d1}
    write("demo_rounds", args.out, result_data, plot)
    return result_data


if __name__ == "__main__":
    main()
