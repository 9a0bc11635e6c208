"""Benchmark 7, requests per round: the gateway's access log, by request kind, per site per steady round.

One kit federation per configuration, 5 sites (the demo's size), the tabular MLP (4 tensors; a
message of Flower's has an object per tensor and per 5 MiB chunk, so a real network of hundreds of
tensors saves more): each message as one flat array (:mod:`flowerbed.wire`, the kit's default) against Flower's own
object trees (``FLOWERBED_FLAT_MESSAGES=0``). While a run goes, the access log's line count is noted
when each round's history row appears; a steady round's requests are the lines between two rows
(rounds 2 on). Every Fleet API request goes through the gateway, so the log holds them all: polls
(``pull-messages``), object pushes and pulls, confirmations, heartbeats. Writes
docs/benchmarks/requests.json and .png.

    python -m benchmarks.requests [--rounds 6] [--sites 5] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write
from flowerbed.runner import check_result, follow, submit
from flowerbed.wire import FLAT_ENV

MODES = {"flat (default)": "1", "Flower's object trees": "0"}


def endpoint(line: str) -> str | None:
    """``push-object`` of ``... "POST /v1/fleet/push-object HTTP/1.1" 200 ...``; None for other lines."""
    parts = line.split('"')
    if len(parts) < 2:
        return None
    request = parts[1].split()
    if len(request) < 2 or not request[1].startswith("/v1/fleet/"):
        return None
    return request[1].rsplit("/", 1)[-1]


def one_run(kit: fed.Kit, settings: Any, name: str) -> dict[str, Any]:
    """Run; per steady round, the gateway's requests by kind (from the access log, between history rows)."""
    log = kit.layout.logs / "gateway-access.log"
    marks: list[int] = []  # the access log's line count when each train row appeared
    done = threading.Event()
    handle = submit(kit.layout, settings, name=name)

    def watch() -> None:
        history = handle.out_dir / "history.jsonl"
        for _ in range(36000):  # bounded: an hour at 0.1 s
            if done.is_set():
                return
            try:
                rows = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
            except (OSError, ValueError):
                rows = []
            trained = sum(1 for r in rows if r.get("kind") == "train")
            while len(marks) < trained:
                marks.append(len(log.read_text(errors="replace").splitlines()))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = follow(kit.layout, handle, timeout_s=1800)
    done.set()
    watcher.join(timeout=10)
    check_result(result, handle)
    lines = log.read_text(errors="replace").splitlines()
    per_round: list[collections.Counter[str]] = []
    for start, end in itertools.pairwise(marks):
        per_round.append(collections.Counter(e for e in map(endpoint, lines[start:end]) if e))
    seconds = [float(r["seconds"]) for r in result.rows if r["kind"] == "train"]
    kinds = sorted({k for c in per_round for k in c})
    sites = len(kit.sites.supervisors)
    by_kind = {k: median([c[k] for c in per_round]) / sites for k in kinds}
    return {"requests_per_site": by_kind, "total_per_site": sum(by_kind.values()),
            "round_s": median(seconds[1:] or seconds), "steady_rounds": len(per_round)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="2 sites, 3 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rounds, count = (3, 2) if args.smoke else (args.rounds, args.sites)
    sites = [f"site-{i:02d}" for i in range(count)]
    model = "tabular MLP (4 tensors)"
    rows: list[dict[str, Any]] = []
    before = os.environ.get(FLAT_ENV)
    with tempfile.TemporaryDirectory(prefix="fb-bench-requests-") as tmp:
        root = Path(tmp)
        demo = fed.data(root / "data")
        for mode, flag in MODES.items():
            os.environ[FLAT_ENV] = flag  # the coordinator's processes inherit it
            try:
                with fed.kit(root / f"kit-{flag}", demo, sites=sites) as kit:
                    measured = one_run(kit, fed.settings(rounds, min_nodes=len(sites)), f"requests-{flag}")
                    rows.append({"mode": mode, "model": model} | measured)
            finally:
                if before is None:
                    os.environ.pop(FLAT_ENV, None)
                else:
                    os.environ[FLAT_ENV] = before
    kinds = sorted({k for r in rows for k in r["requests_per_site"]})
    show(f"Gateway requests per site per steady round, {len(sites)} sites, {rounds} rounds",
         ["configuration", "model", *kinds, "all", "s/round"],
         [[r["mode"], r["model"], *[r["requests_per_site"].get(k, 0.0) for k in kinds], r["total_per_site"],
           r["round_s"]] for r in rows])  # fmt: skip
    flat = {r["model"]: r for r in rows if r["mode"] == "flat (default)"}
    trees = {r["model"]: r for r in rows if r["mode"] != "flat (default)"}
    ratios = {m: trees[m]["total_per_site"] / flat[m]["total_per_site"] for m in flat if m in trees}
    show("Requests saved by flat messages", ["model", "object trees / flat"], [[m, v] for m, v in ratios.items()])

    def plot(ax: Any) -> None:
        labels = [f"{r['mode']}\n{r['model']}" for r in rows]
        bottom = [0.0] * len(rows)
        for kind in kinds:
            values = [r["requests_per_site"].get(kind, 0.0) for r in rows]
            ax.bar(labels, values, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel("requests per site per steady round")
        ax.set_title(f"Gateway requests ({len(sites)} sites)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)

    result = {"smoke": args.smoke, "rounds": rounds, "sites": len(sites), "rows": rows, "ratio": ratios}
    write("requests", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
