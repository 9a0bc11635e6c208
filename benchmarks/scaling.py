"""Benchmark 4, scaling: 2, 4, 8 and 16 SuperNodes on this machine, the demo's light tabular model.

For each size, one kit federation (TLS, node auth, nginx gateway, warm executors) runs ROUNDS rounds;
sampled every second: resident memory of the SuperLink, the gateway (nginx master + workers), the
ServerApp executor with its ServerApp, and each site (SuperNode + executor + task); CPU seconds of
each over the run; requests per second at the gateway (its access log). Fits each against the number
of sites and extrapolates to 100 and 1,000 sites. Writes docs/benchmarks/scaling.json and .png.

    python -m benchmarks.scaling [--sizes 2,4,8,16] [--rounds 5] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import federations as fed
from benchmarks.common import OUT, cpu_s, median, rss_mb, show, write

ROLES = {"superlink": "flower-superlink", "gateway": "gateway (nginx)", "executor": "ServerApp executor"}


def requests_between(log: Path, start: float, end: float) -> int:
    """Lines of nginx's access log (``$time_iso8601`` or ``$time_local``) stamped within [start, end]."""
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        stamp = None
        for token in line.split():
            text = token.strip("[]")
            for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%d/%b/%Y:%H:%M:%S"):
                try:
                    stamp = dt.datetime.strptime(text, fmt)
                    break
                except ValueError:
                    continue
            if stamp is not None:
                break
        if stamp is None:
            continue
        if stamp.tzinfo is None:
            stamp = stamp.astimezone()
        if start <= stamp.timestamp() <= end:
            count += 1
    return count


def one_size(root: Path, sites: int, rounds: int) -> dict[str, Any]:
    demo = fed.data(root / "data")
    names = [f"site-{i:02d}" for i in range(sites)]
    settings = fed.settings(rounds, min_nodes=sites, round_timeout_s=600, node_wait_s=300)
    with fed.kit(root / f"scale-{sites}", demo, sites=names) as kit:
        pids = {role: [p.pid for p in kit.stack.processes if p.name == name and p.pid] for role, name in ROLES.items()}
        site_pids = [[p for p in (s.process.pid if s.process else None, s.executor.pid if s.executor else None) if p]
                     for s in kit.sites.supervisors]  # fmt: skip
        peak = dict.fromkeys([*ROLES, "site"], 0.0)
        done = threading.Event()

        def sample() -> None:
            for _ in range(7200):  # bounded: at most ~2 h
                if done.is_set():
                    return
                for role in ROLES:
                    peak[role] = max(peak[role], rss_mb(pids[role]))
                peak["site"] = max(peak["site"], *(rss_mb(p) for p in site_pids))
                time.sleep(1)

        cpu0 = {role: cpu_s(pids[role]) for role in ROLES}
        sampler = threading.Thread(target=sample, daemon=True)
        started = time.time()
        sampler.start()
        seconds = kit.run(settings, f"scale-{sites}")
        ended = time.time()
        done.set()
        sampler.join(timeout=10)
        cpu = {role: (cpu_s(pids[role]) - cpu0[role]) / len(seconds) for role in ROLES}
        requests = requests_between(kit.layout.logs / "gateway-access.log", started, ended)
    return {"sites": sites, "round_s": median(seconds[1:] or seconds), "rss_mb": peak,
            "cpu_s_per_round": cpu, "gateway_requests_per_s": requests / (ended - started)}  # fmt: skip


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(xs, ys, 1)
    return {"per_site": float(slope), "fixed": float(intercept), "at_100": float(intercept + 100 * slope),
            "at_1000": float(intercept + 1000 * slope)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="2 and 3 sites, 2 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sizes, rounds = ([2, 3], 2) if args.smoke else ([int(s) for s in args.sizes.split(",")], args.rounds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-scale-") as tmp:
        for sites in sizes:
            rows.append(one_size(Path(tmp), sites, rounds))
    xs = [float(r["sites"]) for r in rows]
    fits = {
        "round_s": fit(xs, [r["round_s"] for r in rows]),
        "superlink_rss_mb": fit(xs, [r["rss_mb"]["superlink"] for r in rows]),
        "gateway_rss_mb": fit(xs, [r["rss_mb"]["gateway"] for r in rows]),
        "superlink_cpu_s_per_round": fit(xs, [r["cpu_s_per_round"]["superlink"] for r in rows]),
        "gateway_requests_per_s": fit(xs, [r["gateway_requests_per_s"] for r in rows]),
    }
    show(f"Scaling on this machine ({rounds} rounds per size)",
         ["sites", "s/round", "SuperLink MB", "gateway MB", "executor MB", "MB per site", "SuperLink CPU s/round",
          "gateway CPU s/round", "gateway req/s"],
         [[r["sites"], r["round_s"], r["rss_mb"]["superlink"], r["rss_mb"]["gateway"], r["rss_mb"]["executor"],
           r["rss_mb"]["site"], r["cpu_s_per_round"]["superlink"], r["cpu_s_per_round"]["gateway"],
           r["gateway_requests_per_s"]] for r in rows])  # fmt: skip
    show("Linear fits, extrapolated", ["measure", "fixed", "per site", "100 sites", "1,000 sites"],
         [[k, f["fixed"], f["per_site"], f["at_100"], f["at_1000"]] for k, f in fits.items()])  # fmt: skip

    def plot(ax: Any) -> None:
        ax.plot(xs, [r["round_s"] for r in rows], marker="o", label="s per round")
        ax.plot(xs, [r["cpu_s_per_round"]["superlink"] for r in rows], marker="s", label="SuperLink CPU s per round")
        ax.plot(xs, [r["gateway_requests_per_s"] for r in rows], marker="^", label="gateway requests per s")
        ax.set_xlabel("SuperNodes on this machine")
        ax.set_title("Scaling (all sites share this machine's cores)")
        ax.legend(fontsize=8)

    result = {"smoke": args.smoke, "rounds": rounds, "rows": rows, "fits": fits}
    write("scaling", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
