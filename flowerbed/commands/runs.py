"""``flowerbed runs``: the coordinator's runs (status, rounds, best result), and following one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowerbed.commands.common import FedDir
from flowerbed.console import info, out
from flowerbed.console import table as make_table
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import run_id_of
from flowerbed.runner import RunHandle, run_folder, run_overview, stop, stored_settings
from flowerbed.views import follow_and_report

app = typer.Typer(help="The federation's runs: status, rounds and best result; following one.")


@app.callback(invoke_without_command=True)
def overview(ctx: typer.Context, fed_dir: FedDir = Path()) -> None:
    """Each run folder: its Flower run, status, rounds trained, resumes and best eval accuracy."""
    if ctx.invoked_subcommand is not None:
        return
    rows = run_overview(FederationLayout(fed_dir))
    out.print(
        make_table("Runs", ["run", "flower run", "status", "rounds", "resumes", "best acc", "stop"],
                   ([r.name, r.run_id, r.status, r.rounds, r.resumes, r.best_accuracy, r.stop_reason] for r in rows))
    )  # fmt: skip
    for row in rows:
        if row.status == "interrupted":
            out.print(f"run {row.name} was interrupted: go on with `flowerbed run --resume {row.name}`")


@app.command("follow", help="Follow a run that is going on (e.g. after the terminal that started it closed).")
def follow_cmd(
    name: Annotated[str, typer.Argument(help="The run's folder name under runs/.")],
    fed_dir: FedDir = Path(),
) -> None:
    layout = FederationLayout(fed_dir)
    out_dir = run_folder(layout, name)
    settings = stored_settings(out_dir)
    handle = RunHandle(run_id=run_id_of(out_dir) or 0, out_dir=out_dir)
    follow_and_report(layout, handle, settings.time_budget_s + settings.round_timeout_s + 300)


@app.command("stop", help="End a run after its current round: its final evaluation follows and it completes.")
def stop_cmd(
    name: Annotated[str, typer.Argument(help="The run's folder name under runs/.")],
    why: Annotated[str, typer.Option(help="The reason, kept in the audit trail.")] = "",
    fed_dir: FedDir = Path(),
) -> None:
    """Ask a run to stop gracefully (unlike `flwr stop`, which ends it at once and without a final model)."""
    stop(FederationLayout(fed_dir), name, why)
    out.print(f"run {name} stops after its current round, then evaluates its last model (stop reason "
              "stopped-by-coordinator)")  # fmt: skip
    info(f"follow it with `flowerbed runs follow {name} -d {fed_dir}`")
