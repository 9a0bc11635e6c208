"""Benchmark 9, coordinator memory: peak PSS of the coordinator with 8 sites and a 100 MB model.

One kit federation of SITES sites (TLS, node auth, nginx gateway, warm executors), the tabular MLP
made wide to MODEL_MB; each strategy's run of ROUNDS rounds. Sampled every 0.2 s: the proportional
set size (a page shared by a fork and its parent counts half in each) of the coordinator's processes,
SuperLink, gateway (nginx master and workers) and ServerApp executor with its forked ServerApp; the
peak of their sum per run, against the target of 3x the model's size + 1 GB. FedAvg adds each update
to a running sum as it arrives (serverapp/fold.py); FedMedian needs every update at once and holds
them. Writes docs/benchmarks/memory.json and .png.

    python -m benchmarks.memory [--sites 8] [--model-mb 100] [--rounds 3] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, rss_mb, sampled, show, write
from benchmarks.transfer import hidden_for

ROLES = {"superlink": "flower-superlink", "gateway": "gateway (nginx)", "serverapp": "ServerApp executor"}
STRATEGIES = {"fedavg": "running sum (fedavg)", "fedmedian": "every update held (fedmedian)"}


def peak_of(kit: fed.Kit, settings: Any, name: str) -> dict[str, Any]:
    """Run; the peak PSS (MB) of the coordinator's processes, in all and by role, sampled every 0.2 s."""
    pids = {role: [p.pid for p in kit.stack.processes if p.name == proc and p.pid] for role, proc in ROLES.items()}
    peak = dict.fromkeys([*ROLES, "all"], 0.0)

    def sample() -> None:
        each = {role: rss_mb(p) for role, p in pids.items()}
        for role, mb in each.items():
            peak[role] = max(peak[role], mb)
        peak["all"] = max(peak["all"], sum(each.values()))

    seconds = sampled(lambda: kit.run(settings, name), sample, 0.2)
    return {"peak_mb": peak, "round_s": median(seconds[1:] or seconds), "rounds": len(seconds)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--model-mb", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 sites, a 4 MB model, 1 round (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sites, model_mb, rounds = (2, 4.0, 1) if args.smoke else (args.sites, args.model_mb, args.rounds)
    names = [f"site-{i:02d}" for i in range(sites)]
    target = 3 * model_mb + 1024
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-memory-") as tmp:
        root = Path(tmp)
        demo = fed.data(root / "data")
        with fed.kit(root / "kit", demo, sites=names) as kit:
            for strategy, label in STRATEGIES.items():
                settings = fed.settings(rounds, min_nodes=sites, hidden_units=hidden_for(model_mb), strategy=strategy,
                                        optimizer="sgd", round_timeout_s=1800, node_wait_s=600)  # fmt: skip
                measured = peak_of(kit, settings, f"memory-{strategy}")
                rows.append({"strategy": strategy, "label": label} | measured)
    show(f"Coordinator peak PSS, {sites} sites, a {model_mb:g} MB model, {rounds} rounds (MB)",
         ["aggregation", "SuperLink", "gateway", "ServerApp", "all", "target", "met", "s/round"],
         [[r["label"], r["peak_mb"]["superlink"], r["peak_mb"]["gateway"], r["peak_mb"]["serverapp"],
           r["peak_mb"]["all"], target, "yes" if r["peak_mb"]["all"] < target else "no", r["round_s"]]
          for r in rows])  # fmt: skip

    def plot(ax: Any) -> None:
        labels = [r["label"] for r in rows]
        bottom = [0.0] * len(rows)
        for role in ROLES:
            values = [r["peak_mb"][role] for r in rows]
            ax.bar(labels, values, bottom=bottom, label=role)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.axhline(target, color="black", linestyle="--", label=f"target {target:.0f} MB")
        ax.set_ylabel("peak PSS, MB (each role's own peak)")
        ax.set_title(f"Coordinator memory, {sites} sites x {model_mb:g} MB")
        ax.legend(fontsize=7)

    result = {"smoke": args.smoke, "sites": sites, "model_mb": model_mb, "rounds": rounds, "target_mb": target,
              "rows": rows}  # fmt: skip
    write("memory", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
