"""``flowerbed run``: submit the Flower App and show live progress, then a table and the plot."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from flowerbed.apprun import APP_LOG, AppRound, app_rounds, follow_app, reply_tally, submit_app
from flowerbed.commands.common import FedDir
from flowerbed.config import load_federation
from flowerbed.console import err, out, warn
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.runner import (
    prepare,
    resume,
    run_folder,
    stored_settings,
    submit,
)
from flowerbed.views import app_table, follow_and_report, settings_table

HELP = "Submit a federated run to the local SuperLink and follow it until it stops."


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
    latest: list[str] = [""]

    def said(rounds: list[AppRound]) -> None:
        if rounds:
            last = rounds[-1]
            latest[0] = f", round {last.round}/{last.of}" + "".join(f", {k} {v:.4f}" for k, v in last.evaluate.items())

    with err.status(f"run {started.run_id}: submitted") as status:
        final = follow_app(
            layout, started, timeout_s=timeout_s, on_rounds=said,
            on_status=lambda s, t: status.update(f"run {started.run_id}: {s}{latest[0]}, {t:.0f} s elapsed"),
        )  # fmt: skip
    log = started.out_dir / APP_LOG
    rounds = app_rounds(log.read_text(encoding="utf-8")) if log.exists() else []
    if rounds:
        out.print(app_table(started.run_id, rounds))
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
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
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
        typer.Option(
            help="off; secagg+: Flower's SecAgg+, the coordinator learns only the sum of the updates; "
            "ckks: the sites encrypt their models (TenSEAL), the coordinator adds ciphertexts."
        ),
    ] = None,
    compression: Annotated[
        str | None,
        typer.Option(
            help="none; fp16 or int8: sites send their change in half precision or as int8 (the rounding's loss "
            "carried to the next round), and the model comes back in the same form.",
            click_type=click.Choice(["none", "fp16", "int8"]),
        ),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(
            help="Hold this share of each site's validation data out as test data; the final model is "
            "evaluated on it at the end, with 95% intervals."
        ),
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
    # The run settings given as options, by their federation.toml key: the one list of them.
    settings_given = {
        "strategy": strategy, "max_rounds": max_rounds, "min_nodes": min_nodes, "target_metric": target_metric,
        "target_value": target_value, "patience": patience, "time_budget_s": time_budget_s,
        "local_epochs": local_epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "proximal_mu": proximal_mu, "dp": dp, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta,
        "secure_aggregation": secure_aggregation, "compression": compression, "test_fraction": test_fraction,
        "local_baseline": local_baseline,
    }  # fmt: skip
    if app is not None:
        own = {"task": task, "task_setting": task_setting, "resume": resume_name} | settings_given
        clash = [f"--{key.replace('_', '-')}" for key, value in own.items() if value]
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
    if replace and not (task or "").endswith(".whl"):
        raise FlowerbedError(
            "--replace goes with --task FILE.whl: it replaces the stored wheel of its name and version"
        )
    base = stored_settings(run_folder(layout, resume_name)) if resume_name is not None else None
    prepared = prepare(layout, config, settings_given, task=task, task_settings=parse_settings(task_setting or []),
                       base=base, replace=replace, check_task=resume_name is None)  # fmt: skip
    chosen, settings = prepared.chosen, prepared.settings
    for warning in prepared.warnings:
        warn(warning)
    if resume_name is None and chosen.sha256:
        out.print(f"task {chosen.name} from {chosen.wheel} (sha256 {chosen.sha256})")
    if prepared.effective:
        out.print(settings_table([(s.key, s.value, s.source) for s in prepared.effective]))
    port = config.superlink.internal_port
    if resume_name is not None:
        handle = resume(layout, resume_name, settings, control_port=port, why="; resumed by hand")
        out.print(f"resumed run {resume_name} as Flower run {handle.run_id}; output in {handle.out_dir}")
    else:
        handle = submit(layout, settings, name, control_port=port, task_wheel=chosen.wheel,
                        effective=prepared.effective)  # fmt: skip
        out.print(f"submitted run {handle.run_id}; output in {handle.out_dir}")
    if settings.secure_aggregation == "ckks":
        out.print("secure aggregation (ckks): the sites encrypt their models under a key only they hold; the "
                  "coordinator adds ciphertexts and never holds an update, an aggregate or a model in the clear; "
                  "metrics stay in the clear")  # fmt: skip
    elif settings.secure_aggregation != "off":
        out.print(f"secure aggregation ({settings.secure_aggregation}): the coordinator learns only the sum of the "
                  "sites' updates; metrics and evaluation stay in the clear")  # fmt: skip
    if follow_run:
        follow_and_report(layout, handle, settings.time_budget_s + settings.round_timeout_s + 300)
