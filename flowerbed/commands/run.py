"""``flowerbed run``: submit the Flower App and show live progress, then a table and the plot."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live

from flowerbed import taskstore
from flowerbed.apprun import APP_LOG, follow_app, reply_tally, submit_app
from flowerbed.commands.common import FedDir
from flowerbed.config import RunSettings, load_federation, resolve
from flowerbed.console import err, out, table, warn
from flowerbed.diskspace import MB, device_of, free_bytes
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.protocol import task_name
from flowerbed.runfolder import AWAY, FAILED, FINAL_EVAL, PLOT, RESUMED, STOPPED, TRAIN, WAITING, run_id_of
from flowerbed.runner import RunHandle, RunResult, check_result, follow, resume, run_folder, stored_settings, submit
from flowerbed.serverapp.strategies import client_dp_warning
from flowerbed.task import load_task, task_config

HELP = "Submit a federated run to the local SuperLink and follow it until it stops."
COLUMNS = ["round", "nodes", "failed", "missing", "train loss", "eval loss", "eval acc", "s", "stop"]


LABELS = {FINAL_EVAL: "final", RESUMED: "resume", FAILED: "failed", WAITING: "wait", STOPPED: "stop", AWAY: "away"}


def _round_label(row: dict[str, Any]) -> str:
    label = LABELS.get(str(row.get("kind")))
    if label is None:
        return str(row["round"])
    return label if row.get("kind") in (FINAL_EVAL, RESUMED) else f"{row['round']} {label}"


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
    return table(
        title,
        COLUMNS[:-2] + [name.removeprefix("eval-") for name in extra] + [f"eps {site}" for site in private]
        + COLUMNS[-2:],
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
    out.print(f"plot: {handle.out_dir / PLOT}   history: {handle.out_dir / 'history.csv'}")


def best_line(run_id: int, summary: dict[str, Any]) -> str:
    """The one-line result of a finished run."""
    rounds = summary.get("rounds")
    line = f"run {run_id} stopped: {summary.get('stop_reason')} after {rounds} rounds"
    acc, loss = summary.get("best_eval_accuracy"), summary.get("best_eval_loss")
    if acc is None and loss is None:
        return line + "; no round was evaluated"
    best = summary.get("best_round")
    where = (
        "the final evaluation of the last model"
        if best is not None and rounds is not None and best > rounds
        else f"round {best}"
    )
    score = f"best eval accuracy {acc:.4f}" if acc is not None else f"best eval loss {loss:.4f}"
    return line + f"; {score} ({where})"


def space_warning(runs: Path, model: Any, settings: RunSettings) -> str | None:
    """A warning when the run's checkpoints may not fit where runs/ lives (None: they fit)."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    copies = settings.keep_checkpoints + 3  # the round checkpoints kept, the one being written, best.pt, final
    free = free_bytes(runs)
    if free >= size * copies + 16 * MB:
        return None
    return (f"only {free / MB:.1f} MB free on {device_of(runs)} ({runs}): this run's checkpoints need about "
            f"{size * copies / MB:.1f} MB ({copies} models of {size / MB:.1f} MB); free space, or lower "
            "keep_checkpoints in federation.toml")  # fmt: skip


def run_app(
    layout: FederationLayout, app: Path, name: str | None, config: dict[str, Any], port: int, timeout_s: float | None
) -> None:
    """Submit a Flower App of one's own; follow it to its end unless ``timeout_s`` is None."""
    started = submit_app(layout, app, name, config, control_port=port)
    out.print(f"submitted app {started.app.name} {started.app.version} (sha256 {started.app.sha256}) as run "
              f"{started.run_id}; output in {started.out_dir}")  # fmt: skip
    out.print("each site runs it only if it approved this sha256 (`flowerbed supernode approve APP_FOLDER`)")
    if timeout_s is None:
        return
    with err.status(f"run {started.run_id}: submitted") as status:
        final = follow_app(
            layout, started, timeout_s=timeout_s,
            on_status=lambda s, t: status.update(f"run {started.run_id}: {s}, {t:.0f} s elapsed"),
        )  # fmt: skip
    log = started.out_dir / APP_LOG
    out.print(f"run {started.run_id} {final}; the ServerApp's log: {log}")
    tally = reply_tally(layout, started.run_id)
    for reason in tally.reasons:
        warn(reason)
    if final.endswith("completed") and tally.trained == 0:
        refused = f"{tally.refused} refusal(s)" + (f" and {tally.failed} error(s)" if tally.failed else "")
        raise FlowerbedError(
            f"run {started.run_id}: no site trained ({refused}, no result; the app's ServerApp still said completed): "
            f"see the lines above; the ServerApp's log: {log}",
            exit_code=ExitCode.RUN_FAILED,
        )
    if not final.endswith("completed"):
        raise FlowerbedError(
            f"run {started.run_id} {final}: see the ServerApp's log {log}", exit_code=ExitCode.RUN_FAILED
        )


def parse_settings(items: list[str]) -> dict[str, str | int | float | bool]:
    """``KEY=VALUE`` options as typed values (TOML's reading of VALUE; else the text)."""
    out: dict[str, str | int | float | bool] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise FlowerbedError(f"--task-setting {item!r}: write KEY=VALUE, e.g. --task-setting dropout=0.2")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip()] = value if isinstance(value, str | int | float | bool) else text.strip()
    return out


def run(
    fed_dir: FedDir = Path(),
    task: Annotated[
        str | None,
        typer.Option(
            help="A built-in task, an own task's wheel (TASK.whl), or its name once used (default: run.task)."
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="With --task FILE.whl: replace a stored wheel of the same name and version."),
    ] = False,
    task_setting: Annotated[
        list[str] | None,
        typer.Option(help="The own task's setting KEY=VALUE (repeat it); adds to [run.task_settings]."),
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg, fedprox, fedadam or fedmedian.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Stop after this many rounds.")] = None,
    min_nodes: Annotated[int | None, typer.Option(help="Fail a round with fewer valid replies.")] = None,
    target_metric: Annotated[
        str | None, typer.Option(help="The metric the target is for: accuracy, loss or any the task reports.")
    ] = None,
    target_value: Annotated[float | None, typer.Option(help="Stop when the eval metric reaches it.")] = None,
    patience: Annotated[int | None, typer.Option(help="Rounds without eval-loss improvement.")] = None,
    time_budget_s: Annotated[float | None, typer.Option(help="Wall-time budget in seconds.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Local learning rate.")] = None,
    proximal_mu: Annotated[float | None, typer.Option(help="FedProx mu.")] = None,
    dp: Annotated[
        str | None,
        typer.Option(
            help="off; sample: DP-SGD at every site (sites' own budgets stay the limit); client: client-level DP."
        ),
    ] = None,
    dp_epsilon: Annotated[float | None, typer.Option(help="dp = sample: epsilon per site for the run.")] = None,
    dp_delta: Annotated[float | None, typer.Option(help="dp = sample: delta per site for the run.")] = None,
    secure_aggregation: Annotated[
        str | None,
        typer.Option(help="off; secagg+: Flower's SecAgg+, the coordinator learns only the sum of the updates."),
    ] = None,
    local_baseline: Annotated[
        bool | None,
        typer.Option(
            "--local-baseline/--no-local-baseline",
            help="Each site also trains a local-only model at the end and reports only its metrics.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run folder name under runs/ (default: timestamp).")] = None,
    resume_name: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="NAME",
            help="Go on with runs/NAME from its last checkpoint (options given replace its settings).",
        ),
    ] = None,
    follow_run: Annotated[bool, typer.Option("--follow/--no-follow", help="Show progress until it stops.")] = True,
    app: Annotated[
        Path | None, typer.Option(help="Run a Flower App of your own (its folder) instead of flowerbed's loop.")
    ] = None,
    app_config: Annotated[
        list[str] | None, typer.Option(help="With --app: a run-config override KEY=VALUE (repeat it).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="With --app: stop following after this long.")] = 24 * 3600,
) -> None:
    layout = FederationLayout(fed_dir)
    for given_name in (name, resume_name):  # a name that would leave runs/ is refused before anything starts
        if given_name is not None:
            layout.run_dir(given_name)
    config = load_federation(fed_dir)
    if app is not None:
        given = {"--task": task, "--task-setting": task_setting, "--strategy": strategy, "--max-rounds": max_rounds,
                 "--min-nodes": min_nodes, "--target-metric": target_metric, "--target-value": target_value,
                 "--patience": patience, "--time-budget-s": time_budget_s, "--local-epochs": local_epochs,
                 "--learning-rate": learning_rate, "--proximal-mu": proximal_mu, "--resume": resume_name,
                 "--dp": dp, "--dp-epsilon": dp_epsilon, "--dp-delta": dp_delta,
                 "--secure-aggregation": secure_aggregation, "--local-baseline": local_baseline}  # fmt: skip
        clash = [option for option, value in given.items() if value]
        if clash:
            raise FlowerbedError(f"--app runs the app's own ServerApp: leave out {', '.join(clash)} (use --app-config)")
        run_app(layout, app, name, parse_settings(app_config or []), config.superlink.internal_port,
                timeout_s if follow_run else None)  # fmt: skip
        return
    if app_config:
        raise FlowerbedError("--app-config goes with --app; an own task's settings are --task-setting KEY=VALUE")
    if resume_name is not None and name is not None:
        raise FlowerbedError("--resume NAME goes on in runs/NAME: leave out --name")
    if resume_name is not None and (task is not None or task_setting):
        raise FlowerbedError("a resumed run keeps its task and task settings: leave out --task and --task-setting")
    base = stored_settings(run_folder(layout, resume_name)) if resume_name is not None else config.run
    if replace and not (task or "").endswith(".whl"):
        raise FlowerbedError(
            "--replace goes with --task FILE.whl: it replaces the stored wheel of its name and version"
        )
    chosen = taskstore.choose(layout, task or task_name(base), "" if task else base.task_sha256, replace=replace)
    own = base.task_settings | parse_settings(task_setting or [])
    run_settings = resolve(
        base,
        {
            "task": chosen.name, "task_sha256": chosen.sha256, "task_settings": own, "target_metric": target_metric,
            "strategy": strategy, "max_rounds": max_rounds, "min_nodes": min_nodes,
            "target_value": target_value, "patience": patience, "time_budget_s": time_budget_s,
            "local_epochs": local_epochs, "learning_rate": learning_rate, "proximal_mu": proximal_mu,
            "dp": dp, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta, "local_baseline": local_baseline,
            "secure_aggregation": secure_aggregation,
        },
    )  # fmt: skip
    settings = resolve(config, {"run": run_settings}).run  # min-nodes is checked against the sites too
    dp_warning = client_dp_warning(settings, len(config.sites))
    if dp_warning:
        warn(dp_warning)
    if resume_name is None:  # a task that cannot load, or a setting it has not, is refused here, not at every site
        loaded = load_task(chosen.name, chosen.sha256, chosen.wheel)
        space = space_warning(layout.runs, loaded.model(task_config(loaded, settings.to_run_config())), settings)
        if space:
            warn(space)
        if chosen.sha256:
            out.print(f"task {chosen.name} from {chosen.wheel} (sha256 {chosen.sha256})")
    port = config.superlink.internal_port
    if resume_name is not None:
        handle = resume(layout, resume_name, settings, control_port=port, why="; resumed by hand")
        out.print(f"resumed run {resume_name} as Flower run {handle.run_id}; output in {handle.out_dir}")
    else:
        handle = submit(layout, settings, name, control_port=port, task_wheel=chosen.wheel)
        out.print(f"submitted run {handle.run_id}; output in {handle.out_dir}")
    if settings.secure_aggregation != "off":
        out.print(f"secure aggregation ({settings.secure_aggregation}): the coordinator learns only the sum of the "
                  "sites' updates; metrics and evaluation stay in the clear")  # fmt: skip
    if follow_run:
        follow_and_report(layout, handle, settings.time_budget_s + settings.round_timeout_s + 300)
