"""How a run looks on the console: its live progress, the history table, and the summary lines.

Renderers only (rows in, rich tables and text out); ``flowerbed run``, ``flowerbed runs follow`` and
the demo show runs with them.
"""

from __future__ import annotations

import time
from typing import Any

from rich.live import Live

from flowerbed.console import err, out, table
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import (
    AWAY,
    FAILED,
    FINAL_EVAL,
    HELD_OUT,
    PLOT,
    RESUMED,
    STOPPED,
    TRAIN,
    WAITING,
    metric_kinds,
    run_id_of,
)
from flowerbed.runner import (
    RunHandle,
    RunResult,
    check_result,
    follow,
)

COLUMNS = ["round", "nodes", "failed", "missing", "train loss", "eval loss", "eval acc", "s", "stop"]


LABELS = {FINAL_EVAL: "final", HELD_OUT: "test", RESUMED: "resume", FAILED: "failed", WAITING: "wait",
          STOPPED: "stop", AWAY: "away"}  # fmt: skip


def settings_table(rows: list[tuple[str, Any, str]]) -> Any:
    """The run's effective settings: key, value, and where the value came from."""
    cells = [(key, "" if value is None else str(value), source) for key, value, source in rows]
    return table("settings", ["setting", "value", "from"], cells)


def _round_label(row: dict[str, Any]) -> str:
    label = LABELS.get(str(row.get("kind")))
    if label is None:
        return str(row["round"])
    return label if row.get("kind") in (FINAL_EVAL, HELD_OUT, RESUMED) else f"{row['round']} {label}"


def _trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind", TRAIN) == TRAIN]


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


SHOWN = ("eval-loss", "eval-accuracy", "train-loss")


def extra_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The task's own evaluation metrics (beyond loss and accuracy), in the order they appear."""
    names: list[str] = []
    for row in rows:
        for key in row.get("metrics", {}):
            if key.startswith("eval-") and key not in SHOWN and key not in names:
                names.append(key)
    return names


def _value(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def private_sites(rows: list[dict[str, Any]]) -> list[str]:
    """The sites that trained with DP-SGD in the run, in the order they appear."""
    names: list[str] = []
    for row in rows:
        names += [site for site in row.get("privacy", {}) if site not in names]
    return names


def history_table(rows: list[dict[str, Any]], title: str) -> Any:
    """The run table: one row per round, every metric the task reports, the epsilon each DP-SGD site has
    spent, the final evaluation as its own row."""
    extra = extra_metrics(rows)
    private = private_sites(rows)
    kinds = metric_kinds(rows)
    names = [n.removeprefix("eval-") + (" (pooled)" if kinds.get(n.removeprefix("eval-")) == "pooled" else "")
             for n in extra]  # fmt: skip
    return table(
        title,
        COLUMNS[:-2] + names + [f"eps {site}" for site in private] + COLUMNS[-2:],
        (
            [_round_label(r), r["nodes"], r["failures"], ", ".join(r.get("missing", [])), r["train_loss"],
             r["eval_loss"], r["eval_accuracy"], *(_value(r.get("metrics", {}).get(n)) for n in extra),
             *(_epsilon(r.get("privacy", {}).get(site)) for site in private),
             _seconds(r["seconds"]), r["stop_reason"]]
            for r in rows
        ),
    )  # fmt: skip


def _epsilon(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def progress_title(run_id: int, rows: list[dict[str, Any]], elapsed: float) -> str:
    """``run 7: round 3 done, 41 s elapsed`` (or waiting for the first round)."""
    done = _trained(rows)
    if rows and rows[-1].get("kind") in (WAITING, AWAY):
        return f"run {run_id}: round {rows[-1]['round']} waits for absent sites, {elapsed:.0f} s elapsed"
    if not done:
        return f"run {run_id}: waiting for the first round, {elapsed:.0f} s elapsed"
    return f"run {run_id}: round {done[-1]['round']} done, {elapsed:.0f} s elapsed"


def site_errors(rows: list[dict[str, Any]]) -> list[str]:
    """Every distinct error line of the run's rows (each names its site), in order."""
    lines: list[str] = []
    for row in rows:
        for line in row.get("errors", []):
            if line not in lines:
                lines.append(line)
    return lines


def plain_row(row: dict[str, Any]) -> str:
    """One round as one plain line, every figure the table has (for a pipe or a log file)."""
    parts = [f"{row.get('nodes', 0)} node(s)", f"{row.get('failures', 0)} failure(s)"]
    if row.get("missing"):
        parts.append("missing " + ", ".join(row["missing"]))
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss"), ("eval_accuracy", "accuracy")):
        if row.get(key) is not None:
            parts.append(f"{label} {float(row[key]):.4f}")
    parts += [f"{name.removeprefix('eval-')} {_value(row['metrics'][name])}" for name in extra_metrics([row])]
    parts += [f"eps {site} {_epsilon(eps)}" for site, eps in row.get("privacy", {}).items()]
    parts.append(f"{_seconds(row.get('seconds'))} s")
    line = f"round {_round_label(row)}: " + ", ".join(parts)
    return line + (f"; {row['stop_reason']}" if row.get("stop_reason") else "")


def follow_plain(layout: FederationLayout, handle: RunHandle, timeout_s: float) -> RunResult:
    """Without a terminal (a pipe, a log file): each round as one plain line when it ends, then the table whole."""
    shown = [0]
    said: set[str] = set()

    def update(rows: list[dict[str, Any]]) -> None:
        for line in site_errors(rows):
            if line not in said:
                said.add(line)
                err.print(f"  {line}", soft_wrap=True)
        for row in rows[shown[0] :]:
            err.print(plain_row(row), soft_wrap=True)
        shown[0] = len(rows)

    result = follow(layout, handle, on_rows=update, on_note=err.print, timeout_s=timeout_s)
    rows = result.rows
    err.print(history_table(rows, f"run {result.run_id}: {len(_trained(rows))} round(s)"))  # whole: no terminal
    return result


def follow_live(layout: FederationLayout, handle: RunHandle, timeout_s: float) -> RunResult:
    """Follow a run with a live table (round, nodes, losses, accuracy, elapsed); plain lines without a terminal."""
    if not err.is_terminal:
        return follow_plain(layout, handle, timeout_s)
    started = time.monotonic()
    run_id = [handle.run_id]
    with Live(console=err, refresh_per_second=2, transient=False) as live:
        said: set[str] = set()

        def update(rows: list[dict[str, Any]]) -> None:
            for line in site_errors(rows):  # a site's error or refusal, once, above the table
                if line not in said:
                    said.add(line)
                    live.console.print(f"  {line}", markup=False, soft_wrap=True)
            live.update(history_table(rows, progress_title(run_id[0], rows, time.monotonic() - started)))

        def note(message: str) -> None:
            live.console.print(message, markup=False)
            latest = run_id_of(handle.out_dir)
            run_id[0] = latest if latest is not None else run_id[0]

        return follow(layout, handle, on_rows=update, on_note=note, timeout_s=timeout_s)


def follow_and_report(layout: FederationLayout, handle: RunHandle, timeout_s: float) -> None:
    """Follow to the end, then the one-line result, the plot and the history (a failed run exits 5)."""
    result = follow_live(layout, handle, timeout_s)
    check_result(result, handle)
    out.print(best_line(result.run_id, result.summary))
    scaled = scaling_line(result.summary.get("feature_scaling"))
    if scaled:
        out.print(scaled)
    held = held_out_rows(result.rows)
    if held:
        out.print(table("held-out test of the final model (95% intervals)", held[0], held[1:]))
    out.print(f"plot: {handle.out_dir / PLOT}   history: {handle.out_dir / 'history.csv'}")


def scaling_line(record: dict[str, Any] | None) -> str:
    """What the run standardized its features with, in a line (empty: its model standardizes nothing)."""
    if not record:
        return ""
    if record.get("status") == "standardized":
        sites = record.get("sites") or {}
        return (f"features standardized with the mean and std of {record.get('examples')} training examples at "
                f"{len(sites)} sites (each site sent only per-feature counts, sums and sums of squares; "
                "feature_scaling.json, in the final model too)")  # fmt: skip
    return f"features not standardized: {record.get('reason')}"


def app_table(run_id: int, rounds: list[Any]) -> Any:
    """An app run's rounds (``flowerbed.apprun.AppRound``): each aggregated train and evaluate metric."""
    train = list(dict.fromkeys(k for r in rounds for k in r.train if k != "num-examples"))
    evaluate = list(dict.fromkeys(k for r in rounds for k in r.evaluate if k != "num-examples"))
    return table(f"run {run_id}: {len(rounds)} round(s)", ["round", *train, *evaluate],
                 ([r.round, *(_value(r.train.get(k)) for k in train), *(_value(r.evaluate.get(k)) for k in evaluate)]
                  for r in rounds))  # fmt: skip


def held_out_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The held-out test as a table (a header, then a line per site and one for all sites pooled): each
    metric with its 95% interval (a bootstrap at the site; pooled accuracy: Wilson, from the counts;
    other pooled metrics: the mean weighted by test examples). Empty when the run had none."""
    row = next((r for r in reversed(rows) if r.get("kind") == HELD_OUT), None)
    if row is None or not row.get("metrics"):
        return []
    lines = [(site, m) for site, m in sorted(row.get("per_site", {}).items()) if m.get("num-test")]
    lines.append(("all sites (pooled)", row["metrics"]))
    keys = {k for _, m in lines for k in m if k.startswith("test-") and not k.endswith(("-lo", "-hi"))}
    found = {k.removeprefix("test-") for k in keys}
    names = sorted(found, key=lambda n: (n != "accuracy", n))

    def cell(m: dict[str, Any], name: str) -> str:
        value, lo, hi = m.get(f"test-{name}"), m.get(f"test-{name}-lo"), m.get(f"test-{name}-hi")
        if value is None:
            return "-"
        return f"{value:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else f"{value:.4f}"

    return [["site", "test examples", *names], *([s, int(m.get("num-test", 0)), *(cell(m, n) for n in names)]
                                                  for s, m in lines)]  # fmt: skip


def best_line(run_id: int, summary: dict[str, Any]) -> str:
    """The one-line result of a finished run."""
    rounds = summary.get("rounds")
    line = f"run {run_id} stopped: {summary.get('stop_reason')} after {rounds} rounds"
    acc, loss = summary.get("best_eval_accuracy"), summary.get("best_eval_loss")
    if acc is None and loss is None:
        return line + "; no round was evaluated"
    best = summary.get("best_round")
    where = summary.get("best_model") or (
        "the final evaluation of the last model"
        if best is not None and rounds is not None and best > rounds
        else f"round {best}"
    )
    target, value = summary.get("target_metric"), summary.get("best_target_value")
    if target and value is not None:  # the metric that drove the run names the result
        score = f"best {target} {float(value):.4f}"
    else:
        score = f"best eval accuracy {acc:.4f}" if acc is not None else f"best eval loss {loss:.4f}"
    return line + f"; {score} ({where})"
