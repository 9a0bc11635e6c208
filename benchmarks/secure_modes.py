"""Benchmark 8, what each aggregation mode costs: plain FedAvg, SecAgg+ and CKKS, for two model sizes.

One kit federation of 3 sites (SuperLink, warm executor, nginx gateway, TLS), the demo's tabular MLP
at its default width and widened to about 1M parameters. After one 2-round warm-up run, for each
model and mode one run of ROUNDS rounds: the steady round time (median, round 1 left out), the bytes
of what each site sent per round (its audit trail's update size: weights, SecAgg+'s masked vector or
CKKS ciphertexts) and the coordinator's peak memory (SuperLink, ServerApp executor and its forks,
nginx; proportional set size, sampled every 0.5 s). Prints a table, writes docs/benchmarks/secure_modes.json and .png.

    python -m benchmarks.secure_modes [--rounds 5] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, rss_mb, sampled, show, write
from flowerbed import audit

MODES = {"plain FedAvg": "off", "SecAgg+": "secagg+", "CKKS": "ckks"}
PARAMS_PER_HIDDEN = 33  # the tabular MLP: 30 features -> H hidden -> 2 classes
MODELS = {"demo MLP": None, "1M-parameter MLP": 1_000_000 // PARAMS_PER_HIDDEN}


def trail_lengths(kit: fed.Kit) -> list[int]:
    """How many events each site's audit trail holds now."""
    return [len(audit.read(s.spec.audit_path)) if s.spec.audit_path.exists() else 0 for s in kit.sites.supervisors]


def sent_bytes(kit: fed.Kit, since: list[int]) -> float:
    """The median bytes one site sent per round since ``since`` (its update, as its audit trail records it)."""
    sizes: list[float] = []
    for supervisor, start in zip(kit.sites.supervisors, since, strict=True):
        for event in audit.read(supervisor.spec.audit_path)[start:]:
            details = event["details"]
            if details.get("message") == "secagg-masked" and details.get("masked_bytes"):
                sizes.append(float(details["masked_bytes"]))
            elif details.get("message") == "train" and details.get("update_bytes"):
                sizes.append(float(details["update_bytes"]))
    return median(sizes)


def measure(kit: fed.Kit, mode: str, hidden: int | None, rounds: int, name: str) -> dict[str, Any]:
    """One run of ``rounds`` rounds in ``mode``: round time, bytes per site and round, coordinator memory."""
    changes: dict[str, object] = {"secure_aggregation": mode, "standardize_features": False, "min_nodes": 3}
    if hidden is not None:
        changes["hidden_units"] = hidden
    settings = fed.settings(rounds, **changes)
    pids = [p.pid for p in kit.stack.processes if p.pid]
    peak = [0.0]

    def sample() -> None:
        peak[0] = max(peak[0], rss_mb(pids))

    since = trail_lengths(kit)  # each run's bytes from its own trail lines
    seconds = sampled(lambda: kit.run(settings, name), sample, 0.5)
    params = (hidden or settings.hidden_units) * PARAMS_PER_HIDDEN
    return {"round_s": median(seconds[1:] or seconds), "site_bytes": sent_bytes(kit, since),
            "coordinator_mb": peak[0], "params": params}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="2 rounds, the demo model only, no SecAgg+")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rounds = 2 if args.smoke else args.rounds
    models = {"demo MLP": None} if args.smoke else MODELS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-secure-") as tmp:
        demo = fed.data(Path(tmp) / "data")
        with fed.kit(Path(tmp) / "kit", demo) as kit:
            kit.run(fed.settings(2, standardize_features=False), "bench-warm-up")  # first imports, first pulls
            for model, hidden in models.items():
                for label, mode in MODES.items():
                    if args.smoke and mode == "secagg+":  # tests/test_secure.py runs it
                        continue
                    got = measure(kit, mode, hidden, rounds, f"bench-{mode.replace('+', 'p')}-{hidden or 'demo'}")
                    rows.append({"model": model, "mode": label} | got)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "plain FedAvg")
        row["time_ratio"] = row["round_s"] / base["round_s"]
        row["bytes_ratio"] = row["site_bytes"] / base["site_bytes"] if base["site_bytes"] else None
    show(f"Aggregation modes, 3 sites through the gateway, {rounds} rounds each",
         ["model", "parameters", "mode", "steady round s", "x plain", "MB sent per site and round", "x plain",
          "coordinator peak MB"],
         [[r["model"], f"{r['params']:,}", r["mode"], r["round_s"], r["time_ratio"], r["site_bytes"] / 1e6,
           r["bytes_ratio"], r["coordinator_mb"]] for r in rows])  # fmt: skip

    def plot(axes: Any) -> None:
        labels = [f"{r['mode']}\n{r['model']}" for r in rows]
        axes.bar(range(len(rows)), [r["round_s"] for r in rows], color="#4878a8")
        axes.set_xticks(range(len(rows)), labels, fontsize=7)
        axes.set_ylabel("steady round (s)")
        axes.set_title("Round time by aggregation mode (3 sites)")

    write("secure_modes", args.out, {"smoke": args.smoke, "rounds": rounds, "rows": rows}, plot)


if __name__ == "__main__":
    main()
