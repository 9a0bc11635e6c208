"""Benchmark: raw tabular features with and without federated standardization.

The case from three hosts: raw (unscaled) breast-cancer features (areas in the thousands next to
ratios below 0.1), split at random over 2 sites (:func:`flowerbed.demodata.make_raw_split`), the
kit's default training settings (Adam, lr 0.01, batch 32, 1 local epoch, 32 hidden units), ROUNDS
rounds without early stop, for each of SEEDS seeds: once with ``standardize_features = false`` (the
kit before), once with it on (the default). One kit federation serves every run. Prints the
validation accuracy of the global model after each round (median over seeds, and the worst seed),
the largest drop from one round to the next, and the final model's accuracy on the held-out test CSV;
writes docs/benchmarks/standardize.json and .png.

    python -m benchmarks.standardize [--seeds 3] [--rounds 10] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write
from flowerbed.config import RunSettings
from flowerbed.demo import test_set
from flowerbed.demodata import make_raw_split
from flowerbed.runfolder import FINAL_EVAL, FINAL_MODEL, TRAIN
from flowerbed.runner import check_result, follow, submit
from flowerbed.task import load_task

SITES = ["inst-a", "inst-b"]
CONFIGS = {"standardize_features = false (before)": False, "standardize_features = true (default)": True}


def settings(rounds: int, seed: int, standardize: bool) -> RunSettings:
    """The kit's default training settings on 30 raw features, ``rounds`` rounds, no early stop."""
    return RunSettings.model_validate({
        "min_nodes": 2, "max_rounds": rounds, "num_features": 30, "num_classes": 2, "patience": 10000,
        "target_value": None, "time_budget_s": 36000, "round_timeout_s": 120, "node_wait_s": 120, "seed": seed,
        "standardize_features": standardize,
    })  # fmt: skip


def accuracy_per_round(rows: list[dict[str, Any]]) -> list[float]:
    """The global model's validation accuracy after rounds 1..R: a round's row evaluates the model it was
    sent (after the round before), the final evaluation the model after the last round."""
    trained = [r for r in rows if r["kind"] == TRAIN]
    final = [r for r in rows if r["kind"] == FINAL_EVAL]
    return [float(r["eval_accuracy"]) for r in trained[1:]] + [float(r["eval_accuracy"]) for r in final[-1:]]


def largest_drop(curve: list[float]) -> float:
    """The largest fall of accuracy from one round to the next (0: it never fell)."""
    return max([0.0] + [a - b for a, b in itertools.pairwise(curve)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds, rounds = (1, 2) if args.smoke else (args.seeds, args.rounds)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-standardize-") as tmp:
        root = Path(tmp)
        data = make_raw_split(root / "data", SITES)
        task = load_task("tabular")
        with fed.kit(root / "kit", data, sites=SITES) as kit:
            for seed in range(1, seeds + 1):
                for label, standardize in CONFIGS.items():
                    run_settings = settings(rounds, seed, standardize)
                    handle = submit(kit.layout, run_settings, name=f"seed{seed}-{'on' if standardize else 'off'}")
                    result = follow(kit.layout, handle, timeout_s=1800)
                    check_result(result, handle)
                    model = task.model(run_settings)
                    model.load_state_dict(torch.load(handle.out_dir / FINAL_MODEL, weights_only=True))
                    test = task.evaluate(model, test_set(run_settings, data.test_file), run_settings)
                    curve = accuracy_per_round(result.rows)
                    runs.append({"config": label, "seed": seed, "accuracy": curve, "test_accuracy": test["accuracy"],
                                 "largest_drop": largest_drop(curve), "round1_train_loss":
                                 next(r["train_loss"] for r in result.rows if r["kind"] == TRAIN)})  # fmt: skip
    summary = []
    for label in CONFIGS:
        mine = [r for r in runs if r["config"] == label]
        per_round = [median([r["accuracy"][i] for r in mine]) for i in range(rounds)]
        worst = [min(r["accuracy"][i] for r in mine) for i in range(rounds)]
        summary.append({"config": label, "median_accuracy": per_round, "worst_accuracy": worst,
                        "largest_drop": max(r["largest_drop"] for r in mine),
                        "test_accuracy": [r["test_accuracy"] for r in mine],
                        "round1_train_loss": median([r["round1_train_loss"] for r in mine])})  # fmt: skip
    shown = sorted({0, 1, 2, rounds // 2 - 1, rounds - 1} & set(range(rounds)))
    show(f"Raw breast-cancer features, 2 sites, {len(range(seeds))} seed(s): validation accuracy after each round "
         "(median over seeds; worst seed)",
         ["configuration", *(f"round {i + 1}" for i in shown), "largest drop", "round-1 train loss",
          "final model, test accuracy (median)"],
         [[s["config"], *(f"{s['median_accuracy'][i]:.3f} ({s['worst_accuracy'][i]:.3f})" for i in shown),
           s["largest_drop"], s["round1_train_loss"], median(s["test_accuracy"])] for s in summary])  # fmt: skip

    def plot(ax: Any) -> None:
        for (label, _), color in zip(CONFIGS.items(), ("tab:red", "tab:blue"), strict=True):
            for n, run in enumerate(r for r in runs if r["config"] == label):
                ax.plot(range(1, rounds + 1), run["accuracy"], color=color, alpha=0.7, marker="o", markersize=3,
                        label=label if n == 0 else None)  # fmt: skip
        ax.set_xlabel("round")
        ax.set_ylabel("validation accuracy of the global model")
        ax.set_ylim(0, 1)
        ax.set_title("Raw breast-cancer features, 2 sites (a line per seed)")
        ax.legend(fontsize=8)

    measured = {"smoke": args.smoke, "rounds": rounds, "seeds": seeds, "sites": len(SITES), "runs": runs,
                "rows": summary}  # fmt: skip
    write("standardize", args.out, measured, plot)
    return measured


if __name__ == "__main__":
    main()
