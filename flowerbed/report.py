"""The evidence report of a run: one self-contained HTML file (plots inlined as PNG) for a data steward,
an ethics board or a paper's supplement.

It holds what the run folder and the coordinator's audit trail say: the settings and the task's
sha256, convergence per round, which site took part in which round, the epsilon each DP site spent,
the local-only vs federated (vs centralized, where known) table, and the audit summary.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import html
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowerbed import audit, ckks
from flowerbed.artifacts import read_task_wheel
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import (
    FINAL_EVAL,
    FINAL_MODEL,
    HELD_OUT,
    SUMMARY,
    TRAIN,
    metric_kinds,
    read_rows,
    read_settings,
)
from flowerbed.runner import run_folder, stored_settings
from flowerbed.task import RUN_TASK_WHEEL
from flowerbed.views import scaling_line

REPORT = "report.html"
COMPARISON = "comparison.json"  # the demo's held-out table (local only, federated, centralized)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; }
th { background: #f3f3f3; } td.num { text-align: right; } img { max-width: 100%; }
.ok { color: #1a7f37; } .bad { color: #b42318; } .muted { color: #666; font-size: 0.9rem; }
.wide { overflow-x: auto; max-width: 100%; } code { word-break: break-all; }
@media print {
  body { max-width: none; margin: 0; font-size: 9pt; }
  .wide { overflow: visible; }
  table { width: 100%; table-layout: fixed; font-size: 7pt; } td, th { word-break: break-all; padding: 1px 3px; }
  tr, img { page-break-inside: avoid; } h2 { page-break-after: avoid; }
}
"""


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (8, 3.6)) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(columns: list[str], rows: list[list[Any]], table_id: str) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4g}</td>'
        return f"<td>{html.escape('-' if value is None else str(value))}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _convergence(rows: list[dict[str, Any]]) -> str:
    trained = [r for r in rows if r.get("kind") == TRAIN and r.get("eval_loss") is not None]

    def draw(ax: Any) -> None:
        rounds = [r["round"] for r in trained]
        ax.plot(rounds, [r["eval_loss"] for r in trained], marker="o", label="eval loss (global model)")
        if any(r.get("train_loss") is not None for r in trained):
            ax.plot(rounds, [r.get("train_loss") for r in trained], marker=".", label="train loss")
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        _integer_rounds(ax)
        lines, labels = ax.get_legend_handles_labels()
        if any(r.get("eval_accuracy") is not None for r in trained):
            twin = ax.twinx()
            twin.plot(rounds, [r.get("eval_accuracy") for r in trained], color="tab:green", marker="s",
                      label="eval accuracy (global model)")  # fmt: skip
            twin.set_ylabel("accuracy")
            more, more_labels = twin.get_legend_handles_labels()
            lines, labels = lines + more, labels + more_labels
        ax.legend(lines, labels, loc="center right", fontsize=8)
        ax.set_title("Convergence per round")

    return _png(draw)


STATES = {"trained": 2, "missing": 1, "not asked": 0}


def participation(rows: list[dict[str, Any]]) -> tuple[list[str], list[int], dict[str, dict[int, str]]]:
    """Sites x rounds: ``trained``, ``missing`` (seen earlier, no valid reply) or ``not asked``."""
    trained = [r for r in rows if r.get("kind") == TRAIN]
    sites = sorted(
        {s for r in trained for s in r.get("sites", [])} | {s for r in trained for s in r.get("missing", [])}
    )
    grid: dict[str, dict[int, str]] = {site: {} for site in sites}
    for row in trained:
        for site in sites:
            if site in row.get("sites", []):
                grid[site][row["round"]] = "trained"
            elif site in row.get("missing", []):
                grid[site][row["round"]] = "missing"
            else:
                grid[site][row["round"]] = "not asked"
    return sites, [r["round"] for r in trained], grid


def _participation_png(sites: list[str], rounds: list[int], grid: dict[str, dict[int, str]]) -> str:
    def draw(ax: Any) -> None:
        values = [[STATES[grid[s].get(r, "not asked")] for r in rounds] for s in sites]
        ax.pcolormesh(values, cmap="RdYlGn", vmin=0, vmax=2, edgecolors="white", linewidth=2)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(sites))], sites)
        ax.set_xticks([i + 0.5 for i in range(len(rounds))], [str(r) for r in rounds])
        ax.set_xlabel("round (green: trained, yellow: missing, red: not asked)")
        ax.set_title("Participation per site and round")

    return _png(draw, (8, 0.6 + 0.45 * max(len(sites), 1)))


def _epsilon_png(rows: list[dict[str, Any]]) -> str | None:
    spent = [r for r in rows if r.get("privacy")]
    if not spent:
        return None
    sites = sorted({s for r in spent for s in r["privacy"]})

    def draw(ax: Any) -> None:
        for site in sites:
            points = [(r["round"], r["privacy"][site]) for r in spent if site in r["privacy"]]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
        _integer_rounds(ax)
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon spent")
        ax.legend(fontsize=8)
        ax.set_title("Privacy spent per site (DP-SGD)")

    return _png(draw)


NO_LOCAL = "not measured: run with local_baseline = true (`--local-baseline`) for each site's local-only model"
NO_CENTRAL = ("not measured: a centralized model needs the sites' data pooled in one place, which a federation "
              "avoids (the demo measures it on data it made)")  # fmt: skip


def comparison_rows(
    out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str, list[list[Any]]]:
    """The "local-only vs federated vs centralized" table: what its data is, its metric, its rows; a cell that was not
    measured says why (the run did not ask for local baselines; centralized needs pooled data; the task
    reports no such metric)."""
    path = out_dir / COMPARISON
    if path.exists():  # the demo: every model on one held-out test set
        data = json.loads(path.read_text(encoding="utf-8"))
        return ("the demo's held-out test set, the same for every model", "accuracy", [
            [r["model"], r.get("train_examples"), r.get("accuracy"), r.get("loss")] for r in data
        ])  # fmt: skip
    metric = str(summary.get("target_metric") or "accuracy")

    def cell(metrics: dict[str, Any], key: str, name: str) -> Any:
        return metrics[key] if metrics.get(key) is not None else f"- (the task reports no {name})"

    best = summary.get("best_metrics") or {}
    table: list[list[Any]] = [[f"federated (best model, all sites' validation data): {summary.get('best_model', '-')}",
                               None, cell(best, metric, metric), cell(best, "loss", "loss")]]  # fmt: skip
    final = next((r for r in reversed(rows) if r.get("kind") == FINAL_EVAL and r.get("per_site")), None)
    local = final is not None and any("local-loss" in m for m in final["per_site"].values())
    if final is None or not local:
        table.append(["local only (each site)", None, NO_LOCAL, NO_LOCAL])
    else:
        for site, metrics in sorted(final["per_site"].items()):
            table.append([f"local only: {site}", None, cell(metrics, f"local-{metric}", metric),
                          cell(metrics, "local-loss", "loss")])  # fmt: skip
            table.append([f"federated, on {site}'s held-out split", None, cell(metrics, f"eval-{metric}", metric),
                          cell(metrics, "eval-loss", "loss")])  # fmt: skip
    table.append(["centralized", None, NO_CENTRAL, NO_CENTRAL])
    return ("each site's held-out validation split", metric, table)


def audit_summary(layout: FederationLayout, run: str) -> tuple[str, bool, list[list[Any]]]:
    """The chain's verdict, whether it is sound (chain intact and every anchored log unchanged), and this run's
    events by kind."""
    if not layout.audit.exists():
        return "no audit trail at the coordinator", False, []
    verdict = audit.verify(layout.audit)
    broken = audit.check_anchors(layout.audit)
    state = verdict.describe() + (f"; {broken[0]}" if broken else "; anchored gateway logs unchanged")
    sound = verdict.intact and not broken
    events = audit.read(layout.audit)
    mine = [e for e in events if e.get("details", {}).get("run") == run]
    counts: dict[str, int] = {}
    for event in mine:
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    rows: list[list[Any]] = [[kind, count] for kind, count in sorted(counts.items())]
    clients: dict[str, int] = {}
    for event in events:
        if event.get("kind") == audit.GATEWAY:
            for address, count in event["details"].get("clients", {}).items():
                clients[address] = clients.get(address, 0) + int(count)
    rows += [[f"gateway requests from {address}", count] for address, count in sorted(clients.items())]
    if events:
        rows.append(["trail head", f"event {events[-1]['seq']} {events[-1]['hash'][:16]}"])
    return state, sound, rows


def _held_out_html(rows: list[dict[str, Any]]) -> str:
    """The final model on the sites' held-out test data, with 95% intervals; or why there is none."""
    from flowerbed.views import held_out_rows

    table = held_out_rows(rows)
    if not table:
        return ("<p id='no-test'>This run had no held-out test (set held_out_test, with test_path in each "
                "site.toml, or test_fraction in [run]).</p>")  # fmt: skip
    note = ("<p class='muted'>Never trained on, never used to choose the model. A site's interval: bootstrap "
            "(200 resamples of its test data); pooled accuracy: Wilson, from the sites' counts together; other "
            "pooled figures: the mean weighted by test examples.</p>")  # fmt: skip
    return _table(table[0], table[1:], "held-out") + note


def model_card(out_dir: Path, settings: Any, summary: dict[str, Any]) -> list[list[Any]]:
    """What the model is: its task (name, version, sha256), its layers and parameters (from the final
    model), why the run stopped and the metric that drove it."""
    version = "-"
    wheel = out_dir / RUN_TASK_WHEEL
    if wheel.exists():
        with contextlib.suppress(FlowerbedError, OSError, ValueError):
            version = read_task_wheel(wheel).version
    shapes: list[tuple[str, tuple[int, ...]]] = []
    sealed = None  # CKKS: the coordinator's copy is ciphertext; its manifest names the tensors
    final = out_dir / FINAL_MODEL
    if final.exists():
        import torch

        with contextlib.suppress(Exception):  # a model file from elsewhere: the card says what it can
            state = torch.load(final, weights_only=True, map_location="cpu")
            sealed = ckks.from_record(state)[0] if ckks.is_encrypted(state) else None
            shapes = (list(zip(sealed.names, sealed.shapes, strict=True)) if sealed is not None
                      else [(key, tuple(tensor.shape)) for key, tensor in state.items()])  # fmt: skip
    layers = [f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes]
    params = sum(math.prod(shape) for _, shape in shapes)
    return [
        ["task", settings.task or "tabular (built-in)"], ["task version", version],
        ["task sha256", settings.task_sha256 or "- (built into flowerbed)"],
        ["parameters", params or "- (no final model)"], ["layers", "; ".join(layers) or "-"],
        ["stop reason", summary.get("stop_reason")], ["metric that drove the run", summary.get("target_metric")],
        ["its value for the final model", summary.get("best_target_value")],
        ["final model", f"the best validated model: {summary.get('best_model', '-')}" + (
            f"; encrypted with CKKS key {sealed.key_id}: in the clear only at the sites" if sealed else "")],
        ["feature scaling", scaling_line(summary.get("feature_scaling")) or "- (the model standardizes nothing)"],
    ]  # fmt: skip


def site_rows(rows: list[dict[str, Any]], spent: dict[str, float], secure: bool = False) -> list[list[Any]]:
    """Per site: rounds taken part, its last update's training examples and their class balance,
    validation and test examples, epsilon spent, the digest of the own task's code it ran and when it
    approved that task (each said when missing, and why)."""
    trained = [r for r in rows if r.get("kind") == TRAIN]
    final: dict[str, Any] = next((r for r in reversed(rows) if r.get("kind") == FINAL_EVAL), {})
    held: dict[str, Any] = next((r for r in reversed(rows) if r.get("kind") == HELD_OUT), {})
    sites = sorted({s for r in trained for s in r.get("sites", [])})
    out = []
    for site in sites:
        taken = [r["round"] for r in trained if site in r.get("sites", [])]
        examples = next((r["examples"][site] for r in reversed(trained) if site in r.get("examples", {})), None)
        code = next((r["code"][site] for r in reversed(trained) if site in r.get("code", {})), None)
        classes = next((r["classes"][site] for r in reversed(trained) if site in r.get("classes", {})), None)
        approved = next((r["approved"][site] for r in reversed(trained) if site in r.get("approved", {})), None)
        out.append([site, f"{len(taken)} of {len(trained)}", examples, balance(classes, secure or site in spent),
                    final.get("per_site", {}).get(site, {}).get("examples", "-"),
                    held.get("per_site", {}).get(site, {}).get("num-test", "- (no held-out test)"),
                    spent.get(site, "- (no DP)"), code or "- (built-in task)",
                    approved or ("- (built-in task)" if code is None else "- (not in the site's reply)")])  # fmt: skip
    return out


def balance(classes: dict[str, int] | None, withheld: bool) -> str:
    """A site's class balance, ``0: 120 (60%), 1: 80 (40%)``; said why when the site sent none."""
    if not classes:
        return ("- (not sent under secure aggregation or DP)" if withheld else
                "- (not counted: a large data set that is no TensorDataset)")  # fmt: skip
    total = sum(classes.values()) or 1
    return ", ".join(f"{label}: {count} ({100 * count / total:.0f}%)"
                     for label, count in sorted(classes.items(), key=lambda kv: int(kv[0])))  # fmt: skip


def metric_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[list[Any]]:
    """One line per evaluation metric: how the sites' results combine, its value for the best model and
    in the last trained round."""
    trained = [r for r in rows if r.get("kind") == TRAIN and r.get("metrics")]
    last = trained[-1]["metrics"] if trained else {}
    best = summary.get("best_metrics") or {}
    return [[name, kind, best.get(name), last.get(f"eval-{name}")] for name, kind in metric_kinds(rows).items()]


def write_report(layout: FederationLayout, name: str, out: Path | None = None) -> Path:
    """Write runs/NAME/report.html (or ``out``); returns its path."""
    out_dir = run_folder(layout, name)
    rows = read_rows(out_dir)
    if not rows:
        raise FlowerbedError(f"run {name} has no rounds yet: write its report once it has (`flowerbed runs`)")
    summary_path = out_dir / SUMMARY
    summary: dict[str, Any] = (
        json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {"status": "running"}
    )
    settings = stored_settings(out_dir)
    sites, rounds, grid = participation(rows)
    basis, compared_metric, compared = comparison_rows(out_dir, rows, summary)
    state, sound, audit_rows = audit_summary(layout, name)
    epsilon = _epsilon_png(rows)
    spent: dict[str, float] = summary.get("privacy") or next(
        (r["privacy"] for r in reversed(rows) if r.get("privacy")), {}
    )
    overview: list[list[Any]] = [
        ["status", summary.get("status")], ["stop reason", summary.get("stop_reason")],
        ["rounds trained", len(rounds)], ["best model", summary.get("best_model") or summary.get("best_round")],
        [f"best {summary.get('target_metric') or 'eval accuracy'}",
         summary.get("best_target_value", summary.get("best_eval_accuracy"))],
        *([f"best {name}", value] for name, value in (summary.get("best_metrics") or {}).items()
          if name != summary.get("target_metric")),
        ["task", settings.task or "built-in"],
        ["task sha256", settings.task_sha256 or "-"], ["strategy", settings.strategy],
        ["differential privacy", settings.dp], ["secure aggregation", settings.secure_aggregation],
        ["sites", ", ".join(sites)],
    ]  # fmt: skip
    per_round = [[r["round"], r.get("kind"), r.get("nodes"), r.get("train_loss"), r.get("eval_loss"),
                  r.get("eval_accuracy"), ", ".join(r.get("sites", [])), r.get("stop_reason")]
                 for r in rows]  # fmt: skip
    participation_png = _participation_png(sites, rounds, grid)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>flowerbed run {html.escape(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Federated run <code>{html.escape(name)}</code></h1>",
        f"<p class='muted'>Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by flowerbed from "
        f"{html.escape(str(out_dir))}."
        " Raw data never left any site; this report holds only what the coordinator received.</p>",
        "<h2>Overview</h2>", _table(["", "value"], overview, "overview"),
        "<h2>Convergence</h2>", f"<img id='convergence' alt='convergence per round' src='{_convergence(rows)}'>",
        _table(["round", "kind", "sites", "train loss", "eval loss", "eval accuracy", "which", "stop"], per_round,
               "rounds"),
        _table(["metric", "combined as", "best model", "last round"], metric_table(rows, summary), "metrics"),
        "<p class='muted'>pooled: from the statistics each site sent, summed (its value on all sites' data as "
        "one); weighted mean: the mean of the sites' values, weighted by their examples.</p>",
        "<h2>Held-out test</h2>",
        _held_out_html(rows),
        "<h2>Model card</h2>", _table(["", "value"], model_card(out_dir, settings, summary), "model-card"),
        _table(["setting", "value", "from"], [[r.get("key"), r.get("value"), r.get("source")]
                                              for r in read_settings(out_dir)], "settings"),
        "<h2>Sites</h2>", _table(["site", "rounds taken part", "train examples (last update)",
                                  "class balance (training split)", "validation examples", "test examples",
                                  "epsilon spent", "code that ran (sha256 of the imported files)",
                                  "approved the task sha256 above at"],
                                 site_rows(rows, spent, settings.secure_aggregation != "off"), "sites"),
        "<p class='muted'>Each site approved the task's wheel by its sha256 (the task sha256 above) in its own "
        "site.toml, at the time its replies carried; every task it ran is in the site's own audit trail.</p>",
        "<h2>Participation</h2>",
        f"<img id='participation' alt='participation per site and round' src='{participation_png}'>",
        _table(["site", *[f"round {r}" for r in rounds]], [[s, *[grid[s].get(r, "-") for r in rounds]] for s in sites],
               "participation-table"),
        "<h2>Privacy</h2>",
        (f"<img id='epsilon' alt='epsilon per site' src='{epsilon}'>" if epsilon else
         "<p id='no-dp'>No site trained with DP-SGD in this run.</p>"),
        _table(["site", "epsilon spent"], [[s, float(v)] for s, v in sorted(spent.items())], "epsilon-table")
        if spent else "",
        "<h2>Local-only vs federated vs centralized</h2>", f"<p>On {html.escape(basis)}.</p>",
        _table(["model", "train examples", compared_metric, "loss"], compared, "comparison"),
        "<h2>Audit</h2>",
        f"<p id='audit-state' class='{'ok' if sound else 'bad'}'>"
        f"{html.escape(state)}</p>",
        _table(["events of this run, by kind", "count"], audit_rows, "audit"),
        "</body></html>",
    ]  # fmt: skip
    target = out or out_dir / REPORT
    target.write_text("\n".join(parts), encoding="utf-8")
    return target
