"""Write the results sections of docs/performance.md, privacy.md and demo.md from docs/benchmarks/*.json.

Each benchmark's table, its plot, the machine it ran on and the command that reproduces it, between
the markers ``<!-- results: begin -->`` and ``<!-- results: end -->``; the rest of the page is prose.

    python -m benchmarks.report [--doc docs/performance.md] [--results docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import OUT

BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"
DOC = OUT.parent / "performance.md"


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(_n(v) for v in row) + " |" for row in rows]]  # fmt: skip


def _machine(data: dict[str, Any]) -> str:
    m = data["machine"]
    v = m["versions"]
    when = m["date"][:16].replace("T", " ")
    return (f"Measured {when} UTC on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['system']}, "
            f"Python {m['python']}, flwr {v['flwr']}, torch {v['torch']}. Reproduce: `{data['command']}`.")  # fmt: skip


def round_time(d: dict[str, Any]) -> list[str]:
    rows = [[r["configuration"], r["min_s"], r["median_s"], r["ratio_to_plain"]] for r in d["rows"]]
    return [f"3 sites, {d['repeat']} repetitions of {d['rounds']} rounds, configurations alternating.", "",
            *_table(["configuration", "min s/round", "median s/round", "ratio to plain Flower"], rows)]  # fmt: skip


def time_to_federation(d: dict[str, Any]) -> list[str]:
    rows = [[k, v] for k, v in d["phases_s"].items()]
    rows += [
        ["**kit steps in all**", d["kit_steps_s"]],
        [f"training ({d['rounds']} rounds, excluded)", d["training_s"]],
    ]
    return _table(["phase", "seconds"], rows)


def transfer(d: dict[str, Any]) -> list[str]:
    raw = max(r["raw_tls_mb_s"] for r in d["rows"])
    rows = [[r["model_mb"], r["raw_tls_mb_s"], r["kit_round_s"], r["kit_mb_s"], r["kit_vs_raw"], r["plain_round_s"],
             r["plain_mb_s"], r["plain_vs_raw"]] for r in d["rows"]]  # fmt: skip
    return [f"Raw TLS on this machine's loopback: up to {raw:.0f} MB/s (best of 3 next to each size). "
            "Tiny-model round (the fixed cost taken out): "
            f"kit {d['tiny_round_s']['kit']:.2f} s, plain Flower {d['tiny_round_s']['plain']:.2f} s.", "",
            *_table(["model MB", "raw TLS MB/s", "kit s/round", "kit MB/s", "kit / raw TLS", "plain Flower s/round",
                     "plain MB/s", "plain / raw TLS"], rows),
            *_tls_and_gateway(d["rows"]),
            "", "Marginal throughput (4 x MB per round over the slope of round seconds against model MB):", "",
            *_table(["configuration", "MB/s", "vs raw TLS"],
                    [[LABELS.get(k, k), v, v / raw] for k, v in d.get("marginal_mb_s", {}).items()])]  # fmt: skip


LABELS = {"kit": "kit, through the gateway", "direct": "kit, no gateway", "plain": "plain Flower (its defaults)",
          "plain_tls": "plain Flower, TLS + state file"}  # fmt: skip


def _tls_and_gateway(rows: list[dict[str, Any]]) -> list[str]:
    """The transfer rows' comparisons with plain Flower secured as the kit's SuperLink is, and without the gateway."""
    if not all("plain_tls_round_s" in r and "direct_round_s" in r for r in rows):
        return []
    table = [[r["model_mb"], r["plain_round_s"], r["plain_tls_round_s"], r["direct_round_s"], r["kit_round_s"],
              r["kit_round_s"] / r["plain_round_s"], r["kit_round_s"] / r["plain_tls_round_s"]]
             for r in rows]  # fmt: skip
    return ["", "Plain Flower as the kit's SuperLink must run (TLS with the kit's certificates, its state in an SQLite "
            "file; no node auth), and the kit with its sites straight at the SuperLink (no gateway):", "",
            *_table(["model MB", "plain s/round", "plain, TLS + state file s/round", "kit, no gateway s/round",
                     "kit s/round", "kit / plain", "kit / plain with TLS + state file"], table)]  # fmt: skip


def scaling(d: dict[str, Any]) -> list[str]:
    rows = [[r["sites"], r["round_s"], r["rss_mb"]["superlink"], r["rss_mb"]["gateway"], r["rss_mb"]["executor"],
             r["rss_mb"]["site"], r["cpu_s_per_round"]["superlink"], r["cpu_s_per_round"]["gateway"],
             r["gateway_requests_per_s"]] for r in d["rows"]]  # fmt: skip
    fits = [[k, f["fixed"], f["per_site"], f["at_100"], f["at_1000"]] for k, f in d["fits"].items()]
    return [*_table(["sites", "s/round", "SuperLink MB", "gateway MB", "executor + ServerApp MB", "MB per site",
                     "SuperLink CPU s/round", "gateway CPU s/round", "gateway requests/s"], rows), "",
            "Linear fits (value = fixed + per site x sites), extrapolated on paper:", "",
            *_table(["measure", "fixed", "per site", "100 sites", "1,000 sites"], fits)]  # fmt: skip


def kit_ops(d: dict[str, Any]) -> list[str]:
    rows = [[r["sites"], *[r["phases_s"][p] for p in ("init", "certs init", "certs server", "kit build")],
             r["total_s"], r["per_kit_ms"], r["kits_mb_on_disk"]] for r in d["rows"]]  # fmt: skip
    return _table(["sites", "init s", "certs init s", "certs server s", "kit build s", "total s", "ms per kit",
                   "kits on disk MB"], rows)  # fmt: skip


def demo_rounds(d: dict[str, Any]) -> list[str]:
    rows = [[r["run"], r["total_s"], r["rounds"], r["round_median_s"], r["stop"], r["federated_accuracy"]]
            for r in d["rows"]]  # fmt: skip
    lines = _table(["run", "whole demo s", "rounds", "median s/round", "stop", "federated accuracy"], rows)
    d1 = d.get("d1")
    if d1:
        met = "met" if d1["ratio"] <= d1["target"] else "not met"
        lines += ["", f"Bar D1, the demo's steady round against plain Flower 1.42's with the same {d1['nodes']} nodes, "
                  f"task, recipe and data: {d1['kit_round_s']:.2f} s vs {d1['plain_round_s']:.2f} s, "
                  f"**{d1['ratio']:.2f}x** (target <= {d1['target']}: {met})."]  # fmt: skip
    return lines


def requests(d: dict[str, Any]) -> list[str]:
    kinds = sorted({k for r in d["rows"] for k in r["requests_per_site"]})
    rows = [[r["mode"], *[r["requests_per_site"].get(k, 0.0) for k in kinds], r["total_per_site"], r["round_s"]]
            for r in d["rows"]]  # fmt: skip
    ratios = ", ".join(f"{m}: {v:.2f}x" for m, v in d.get("ratio", {}).items())
    return [f"Gateway requests per site per steady round (median of rounds 2-{d['rounds']}), {d['sites']} sites:", "",
            *_table(["configuration", *kinds, "all", "s/round"], rows), "",
            f"Object trees over flat messages: {ratios}."]  # fmt: skip


def compression(d: dict[str, Any]) -> list[str]:
    rows = [[r["mode"], r["bytes_per_round"] / 1e3, r["bytes_ratio"], r["accuracy"], r["accuracy_points"],
             r["round_s"]] for r in d["rows"]]  # fmt: skip
    lines = [f"The demo (5 sites, digits), {d['seeds']} seed(s) x {d['rounds']} rounds; bytes of a steady round's "
             "messages, down to all sites and up from them:", "",
             *_table(["compression", "kB per round", "fewer bytes", "final accuracy", "vs none (points)", "s/round"],
                     rows)]  # fmt: skip
    if d.get("big"):
        big = [[r["mode"], r["bytes_per_round"] / 1e6, r["bytes_ratio"], r["round_s"]] for r in d["big"]]
        lines += ["", f"A {d['big'][0]['model_mb']:g} MB model, 3 sites:", "",
                  *_table(["compression", "MB per round", "fewer bytes", "s/round"], big)]  # fmt: skip
    return lines


def memory(d: dict[str, Any]) -> list[str]:
    rows = [[r["label"], r["peak_mb"]["superlink"], r["peak_mb"]["gateway"], r["peak_mb"]["serverapp"],
             r["peak_mb"]["all"], "yes" if r["peak_mb"]["all"] < d["target_mb"] else "no", r["round_s"]]
            for r in d["rows"]]  # fmt: skip
    return [f"Peak PSS of the coordinator's processes (MB, sampled every 0.2 s), {d['sites']} sites, a "
            f"{d['model_mb']:g} MB model, {d['rounds']} rounds; target: under 3x the model + 1 GB = "
            f"{d['target_mb']:.0f} MB:", "",
            *_table(["aggregation", "SuperLink", "gateway", "ServerApp", "all", "met", "s/round"], rows)]  # fmt: skip


def wan(d: dict[str, Any]) -> list[str]:
    rows = [[r["mode"], r["per_site_mb"], r["link_s"], r["compute_s"], r["floor_s"], r["round_s"], r["ratio"]]
            for r in d["rows"]]  # fmt: skip
    lines = [f"{d['sites']} sites, each on a {d['site_mbit']:g} Mbit/s link with {d['delay_ms']:g} ms each way, into "
             f"a {d['coord_mbit']:g} Mbit/s coordinator (relays on loopback), a {d['model_mb']:g} MB model; the floor "
             "is each site's bytes over its bandwidth, a task's round-trips and the compute (target: within 1.3x):",
             "", *_table(["compression", "MB per site", "link s", "compute s", "floor s", "kit s/round", "kit / floor"],
                         rows)]  # fmt: skip
    local = [[r["mode"], r["local_round_s"], r["local_ratio"], r["round_s"], r["link_added_s"], r["link_s"]]
             for r in d["rows"] if "local_round_s" in r]  # fmt: skip
    if local:
        lines += ["", "The same federation with relays that neither delay nor cap (this machine's own processing of "
                  "the bytes: TLS, HTTP, hashing and copies at each hop, all sites and the coordinator on its "
                  f"{d['rows'][0].get('cores', 2)} shared cores), and what the link added:", "",
                  *_table(["compression", "no link s/round", "no link / floor", "over the link s/round",
                           "link added s", "link's bytes over bandwidth s"], local)]  # fmt: skip
    return lines


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
    ("round_time", "1. Round time", round_time),
    ("time_to_federation", "2. Time to federation", time_to_federation),
    ("transfer", "3. Model transfer", transfer),
    ("scaling", "4. Scaling", scaling),
    ("kit_ops", "5. Kit operations", kit_ops),
    ("requests", "6. Requests per round", requests),
    ("compression", "7. Update compression", compression),
    ("memory", "8. Coordinator memory", memory),
    ("wan", "9. A real link", wan),
    ("demo_rounds", "The demo", demo_rounds),
]


def privacy(d: dict[str, Any]) -> list[str]:
    rows = [[r["setting"], f"{100 * r['accuracy']:.1f}%", f"{100 * r['accuracy_min']:.1f}%", r["epsilon"],
             r["train_s"]] for r in d["rows"]]  # fmt: skip
    agree = [[r["accountant"], r["epsilon"]] for r in d["accountants"]]
    return [f"Pooled digits (scikit-learn's 8x8 digits, 75/25 split), the kit's MLP, {d['epochs']} epochs, "
            f"delta {d['delta']:g}, mean of {d['seeds']} seed(s):", "",
            *_table(["setting", "test accuracy (mean)", "(min)", "epsilon counted by the ledger", "train s"], rows),
            "", "250 patients, batch 16, 300 steps, noise multiplier 1.0, delta 1e-5:", "",
            *_table(["accountant", "epsilon"], agree)]  # fmt: skip


def standardize(d: dict[str, Any]) -> list[str]:
    rounds = d["rounds"]
    shown = sorted({0, 1, 2, rounds // 2 - 1, rounds - 1} & set(range(rounds)))
    rows = [[r["config"], *(f"{r['median_accuracy'][i]:.3f} ({r['worst_accuracy'][i]:.3f})" for i in shown),
             f"{r['largest_drop']:.3f}", r["round1_train_loss"],
             f"{min(r['test_accuracy']):.3f}-{max(r['test_accuracy']):.3f}"] for r in d["rows"]]  # fmt: skip
    return [f"Raw breast-cancer features, {d['sites']} sites (random halves), the kit's default training settings, "
            f"{rounds} rounds, {d['seeds']} seed(s); validation accuracy of the global model after each round, "
            "median over seeds (worst seed):", "",
            *_table(["configuration", *(f"round {i + 1}" for i in shown), "largest drop between rounds",
                     "round-1 train loss", "final model, test accuracy (seeds)"], rows)]  # fmt: skip


PRIVACY_DOC = OUT.parent / "privacy.md"
PRIVACY_MARKERS = ("<!-- privacy: begin -->", "<!-- privacy: end -->")
PRIVACY_SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
    ("privacy", "DP-SGD's accuracy cost", privacy),
]


def secure_modes(d: dict[str, Any]) -> list[str]:
    rows = [[r["model"], f"{r['params']:,}", r["mode"], r["round_s"], r["time_ratio"], _n(r["site_bytes"] / 1e6),
             _n(r["bytes_ratio"]) if r["bytes_ratio"] is not None else "-", round(r["coordinator_mb"])]
            for r in d["rows"]]  # fmt: skip
    return [f"3 sites through the gateway, {d['rounds']} rounds per mode after a warm-up run; the steady round "
            "(median), what one site sent per round, the coordinator's peak memory:", "",
            *_table(["model", "parameters", "mode", "steady round s", "x plain", "MB sent per site and round",
                     "x plain", "coordinator peak MB"], rows)]  # fmt: skip


SECURE_MARKERS = ("<!-- secure_modes: begin -->", "<!-- secure_modes: end -->")
SECURE_SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
    ("secure_modes", "Aggregation modes measured", secure_modes),
]


DEMO_DOC = OUT.parent / "demo.md"
DEMO_MARKERS = ("<!-- standardize: begin -->", "<!-- standardize: end -->")
DEMO_SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
    ("standardize", "Before and after", standardize),
]


def render(results: Path, sections: list[Any] = SECTIONS, markers: tuple[str, str] = (BEGIN, END)) -> str:
    lines = [markers[0], ""]
    for name, title, table in sections:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        lines += [f"### {title}", "", _machine(data), "", *table(data), ""]
        if (results / f"{name}.png").exists():
            lines += [f"![{title}](benchmarks/{name}.png)", ""]
    return "\n".join([*lines, markers[1]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=OUT)
    args = parser.parse_args(argv)
    pages = [(args.doc, SECTIONS, (BEGIN, END)),
             (args.doc.parent / PRIVACY_DOC.name, PRIVACY_SECTIONS, PRIVACY_MARKERS),
             (args.doc.parent / PRIVACY_DOC.name, SECURE_SECTIONS, SECURE_MARKERS),
             (args.doc.parent / DEMO_DOC.name, DEMO_SECTIONS, DEMO_MARKERS)]  # fmt: skip
    for doc, sections, (begin, end_marker) in pages:
        text = doc.read_text(encoding="utf-8")
        start, end = text.index(begin), text.index(end_marker) + len(end_marker)
        section = render(args.results, sections, (begin, end_marker))
        doc.write_text(text[:start] + section + text[end:], encoding="utf-8")
        print(f"wrote the results of {args.results} into {doc}")


if __name__ == "__main__":
    main()
