"""Benchmark 1, round time: the kit against plain Flower 1.42, Flower's simulation engine and pure compute.

In one sitting, alternating, 3 sites, the same task and data (the demo's tabular MLP): each repetition
runs every configuration once for ROUNDS rounds (the smoke size leaves out the executor, thread,
simulation and SecAgg+ variants). The kit's sites share this machine, so each task gets one torch
thread; one configuration gives each task all cores (the setting for a site's own VM), one runs the
kit's default with secure aggregation (SecAgg+: four message exchanges per round). A steady round
leaves out round 1. Prints a table with seconds per steady round (min, median) and the ratio to
plain Flower (median of the per-repetition ratios), writes docs/benchmarks/round_time.json and .png.

    python -m benchmarks.round_time [--repeat 3] [--rounds 8] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write

CONFIGS = ["kit (warm executor, default)", "kit, subprocess executor", "plain Flower 1.42", "simulation (Ray)",
           "compute floor", "kit, torch threads = cores", "kit, SecAgg+"]  # fmt: skip
# Left out of the smoke size: tests/test_secure.py runs SecAgg+; Ray's start costs the suite a minute of CPU.
VARIANTS = {CONFIGS[1], CONFIGS[3], CONFIGS[5], CONFIGS[6]}


def one_repetition(tmp: Path, rounds: int, rep: int, smoke: bool = False) -> dict[str, list[float]]:
    demo = fed.data(tmp / "data")
    settings = fed.settings(rounds)
    got: dict[str, list[float]] = {}
    with fed.kit(tmp / f"kit-{rep}", demo) as kit:
        got[CONFIGS[0]] = kit.run(settings, f"bench-{rep}")
        if not smoke:
            secure = settings.model_copy(update={"secure_aggregation": "secagg+"})
            got[CONFIGS[6]] = kit.run(secure, f"bench-secagg-{rep}")
    if not smoke:
        with fed.kit(tmp / f"kit-sub-{rep}", demo, executor="subprocess") as kit:
            got[CONFIGS[1]] = kit.run(settings, f"bench-sub-{rep}")
    with fed.plain(tmp / f"plain-{rep}", demo) as plain:
        got[CONFIGS[2]] = plain.run(settings, f"plain-{rep}")
    if not smoke:
        got[CONFIGS[3]] = fed.simulation(tmp / f"sim-{rep}", demo, settings)
    got[CONFIGS[4]] = fed.compute_floor(demo, settings, rounds)
    if not smoke:
        with fed.kit(tmp / f"kit-threads-{rep}", demo, torch_threads=0) as kit:
            got[CONFIGS[5]] = kit.run(settings, f"bench-threads-{rep}")
    return got


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="1 repetition of 2 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    repeat, rounds = (1, 2) if args.smoke else (args.repeat, args.rounds)
    reps: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-round-") as tmp:
        for rep in range(repeat):
            reps.append(one_repetition(Path(tmp), rounds, rep, args.smoke))
    configs = [c for c in CONFIGS if c in reps[0]]
    steady = {c: [s for r in reps for s in r[c][1:]] for c in configs}
    plain_key = CONFIGS[2]
    rows: list[list[Any]] = []
    for c in configs:
        ratios = [median(r[c][1:]) / median(r[plain_key][1:]) for r in reps]
        rows.append([c, min(steady[c]), median(steady[c]), median(ratios)])
    show(f"Seconds per steady round, 3 sites, {repeat} x {rounds} rounds", ["configuration", "min s", "median s",
         "ratio to plain Flower"], rows)  # fmt: skip

    def plot(ax: Any) -> None:
        labels = [str(r[0]).replace(" (", "\n(").replace(", ", ",\n") for r in rows]
        ax.bar(labels, [r[2] for r in rows], color="#4c72b0")
        ax.set_ylabel("median s per steady round")
        ax.set_title("Round time, 3 sites (lower is better)")
        ax.tick_params(axis="x", labelsize=7)

    result = {"repeat": repeat, "rounds": rounds, "sites": 3, "smoke": args.smoke,
              "rows": [{"configuration": r[0], "min_s": r[1], "median_s": r[2], "ratio_to_plain": r[3]} for r in rows],
              "raw": reps}  # fmt: skip
    write("round_time", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
