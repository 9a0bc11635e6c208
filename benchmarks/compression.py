"""Benchmark 8, update compression: bytes per round and final accuracy for none, fp16 and int8.

A: the demo (5 sites, scikit-learn's digits, the demo's recipe), each mode with SEEDS seeds: the bytes
of a steady round's messages (down to all sites and up from them, as packed: the run history's
``traffic``), and the final model's accuracy (its final evaluation, all sites). B: a 50 MB model
(the tabular MLP made wide), 3 sites: bytes per round and seconds per steady round. Writes
docs/benchmarks/compression.json and .png.

    python -m benchmarks.compression [--seeds 3] [--rounds 10] [--big-mb 50] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write
from benchmarks.transfer import hidden_for
from flowerbed.config import RunSettings
from flowerbed.demo import SITES as DEMO_SITES
from flowerbed.demo import demo_settings
from flowerbed.demodata import make_digits_data
from flowerbed.runner import check_result, follow, submit

MODES = ("none", "fp16", "int8")


def one_run(kit: fed.Kit, settings: Any, name: str) -> dict[str, Any]:
    handle = submit(kit.layout, settings, name=name)
    result = follow(kit.layout, handle, timeout_s=3600)
    check_result(result, handle)
    trained = [r for r in result.rows if r["kind"] == "train"]
    steady = trained[1:] or trained
    final = next((r for r in result.rows if r["kind"] == "final-eval"), {})
    return {"bytes_per_round": median([r["traffic"].get("down", 0) + r["traffic"].get("up", 0) for r in steady]),
            "round_s": median([float(r["seconds"]) for r in steady]), "rounds": len(trained),
            "accuracy": final.get("eval_accuracy")}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--big-mb", type=float, default=50.0)
    parser.add_argument("--smoke", action="store_true", help="3 of the 5 sites, 1 seed, 2 rounds, no large model (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds, rounds = (1, 2) if args.smoke else (args.seeds, args.rounds)
    demo_rows: list[dict[str, Any]] = []
    big_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-compression-") as tmp:
        root = Path(tmp)
        sites = DEMO_SITES["digits"][:3] if args.smoke else DEMO_SITES["digits"]
        digits = make_digits_data(root / "digits", sites)
        base = demo_settings("digits").model_dump() | {
            "max_rounds": rounds,
            "target_value": None,
            "patience": 1000,
            "min_nodes": len(sites),
        }
        with fed.kit(root / "demo", digits, sites=sites, data_set="digits") as kit:
            for mode in MODES:
                runs = [one_run(kit, RunSettings.model_validate(base | {"compression": mode, "seed": seed}),
                                f"demo-{mode}-{seed}") for seed in range(seeds)]  # fmt: skip
                demo_rows.append({"mode": mode, "bytes_per_round": median([r["bytes_per_round"] for r in runs]),
                                  "accuracy": statistics.mean(r["accuracy"] for r in runs),
                                  "accuracies": [r["accuracy"] for r in runs],
                                  "round_s": median([r["round_s"] for r in runs])})  # fmt: skip
        if not args.smoke:
            demo = fed.data(root / "tabular")
            with fed.kit(root / "big", demo) as kit:
                for mode in MODES:
                    settings = fed.settings(3, min_nodes=3, local_epochs=1, hidden_units=hidden_for(args.big_mb),
                                            round_timeout_s=1200, compression=mode)  # fmt: skip
                    big_rows.append({"mode": mode, "model_mb": args.big_mb} | one_run(kit, settings, f"big-{mode}"))
    plain = next(r for r in demo_rows if r["mode"] == "none")
    for row in demo_rows:
        row["bytes_ratio"] = plain["bytes_per_round"] / row["bytes_per_round"]
        row["accuracy_points"] = 100 * (row["accuracy"] - plain["accuracy"])
    show(f"Compression on the demo ({len(sites)} sites, digits; {seeds} seed(s) x {rounds} rounds)",
         ["compression", "kB per round", "fewer bytes", "final accuracy", "vs none (points)", "s/round"],
         [[r["mode"], r["bytes_per_round"] / 1e3, r["bytes_ratio"], r["accuracy"], r["accuracy_points"],
           r["round_s"]] for r in demo_rows])  # fmt: skip
    if big_rows:
        big_plain = big_rows[0]
        for row in big_rows:
            row["bytes_ratio"] = big_plain["bytes_per_round"] / row["bytes_per_round"]
        show(f"A {args.big_mb:g} MB model, 3 sites", ["compression", "MB per round", "fewer bytes", "s/round"],
             [[r["mode"], r["bytes_per_round"] / 1e6, r["bytes_ratio"], r["round_s"]] for r in big_rows])  # fmt: skip

    def plot(ax: Any) -> None:
        ax.bar([r["mode"] for r in demo_rows], [r["bytes_per_round"] / 1e3 for r in demo_rows], color="#4c72b0")
        ax.set_ylabel("kB per steady round (all sites, both ways)")
        ax.set_title("Update compression on the demo")
        for i, r in enumerate(demo_rows):
            ax.annotate(f"acc {r['accuracy']:.3f}", (i, r["bytes_per_round"] / 1e3), ha="center", va="bottom",
                        fontsize=8)  # fmt: skip

    result = {"smoke": args.smoke, "seeds": seeds, "rounds": rounds, "rows": demo_rows, "big": big_rows}
    write("compression", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
