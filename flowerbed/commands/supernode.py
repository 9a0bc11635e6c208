"""``flowerbed supernode``: preflight, then a supervised outbound-only SuperNode."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from flowerbed.clientapp.privacy import ledgers
from flowerbed.commands.common import stop_on_signals
from flowerbed.config import SITE_FILE
from flowerbed.console import info, out, table, warn
from flowerbed.errors import FlowerbedError
from flowerbed.supernode.approval import approve, candidate, load_site, revoke, sharing_modules
from flowerbed.supernode.preflight import clock_probe, link_probe, require, run_preflight
from flowerbed.supernode.sitekit import site_spec
from flowerbed.supernode.supervisor import Supervisor

app = typer.Typer(help="Run this site's SuperNode (outbound only).", no_args_is_help=True)


@app.command("start", help="Check data, CA, key and the SuperLink, then run and supervise the SuperNode.")
def start(
    kit: Annotated[Path | None, typer.Option(help="Unpacked site kit folder (holds site.toml).")] = None,
    superlink: Annotated[
        str | None, typer.Option(help="Gateway address HOST:PORT, e.g. link.example.org:9092.")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="Federation CA certificate (ca.crt from the kit).")] = None,
    key: Annotated[Path | None, typer.Option(help="This site's node private key (SITE.key from the kit).")] = None,
    data: Annotated[Path | None, typer.Option(help="Local data: a CSV file or a folder of class folders.")] = None,
    site: Annotated[str | None, typer.Option(help="Site name (default: from the kit or the key's file name).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Folder for logs and Flower state.")] = None,
    port: Annotated[int | None, typer.Option(help="Loopback port of the SuperNode's local API (9094).")] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="warm (default): each task is a fork of one process that imported torch once; "
            "subprocess: a new process per task, as plain Flower does.",
            click_type=click.Choice(["warm", "subprocess"]),
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=0, help="torch threads per task (default: all cores; give 1 when sites share a machine)."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Where tasks train: auto (the GPU if torch sees one), cpu, cuda or cuda:N (site.toml device)."
        ),
    ] = None,
    rejected_window_s: Annotated[
        float, typer.Option(help="How long a refused node key is retried before giving up.")
    ] = 150,
    preflight_only: Annotated[bool, typer.Option("--preflight-only", help="Only run the checks.")] = False,
) -> None:
    spec = site_spec(
        kit, superlink=superlink, ca=ca, key=key, data=data, site=site, workdir=workdir, port=port,
        executor=executor, threads=threads, device=device,
    )  # fmt: skip
    checks = run_preflight(spec.superlink, spec.ca, spec.key, spec.data, site=spec.site, site_file=spec.site_file,
                           device=spec.device)  # fmt: skip
    out.print(table("Preflight", ["check", "ok", "detail"],
                    ([c.name, "yes" if c.ok else "NO", c.detail] for c in checks)))  # fmt: skip
    require(checks)
    if preflight_only:
        return
    stop = stop_on_signals()
    Supervisor(
        spec,
        report=info,
        rejected_window_s=rejected_window_s,
        link_probe=link_probe(spec),
        clock_probe=clock_probe(spec),
    ).run(stop.is_set)
    info("SuperNode stopped")


KitDir = Annotated[Path, typer.Option("--kit", help="The unpacked site kit folder (holds site.toml).")]


def _missing_dependencies(requires: list[str]) -> list[str]:
    """The dependencies not installed in this environment (by distribution name)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(text)
        except PackageNotFoundError:
            missing.append(text)
    return missing


@app.command("decrypt-model", help="Decrypt a ckks run's model file (from the coordinator) with this site's key.")
def decrypt_model_cmd(
    model: Annotated[Path, typer.Argument(help="The coordinator's final_model.pt (or best.pt) of a ckks run.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Where the plain model goes (0600).")] = Path(
        "final_model.plain.pt"
    ),
    kit: Annotated[Path | None, typer.Option(help="Unpacked site kit folder (its workdir holds the keys).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="The SuperNode's work folder (default: the kit's).")] = None,
) -> None:
    from flowerbed.clientapp.ckks import decrypt_file

    if workdir is None:
        workdir = site_spec(kit).workdir if kit is not None else Path("supernode-work")
    manifest = decrypt_file(model, workdir.resolve() / "he", output)
    info(f"decrypted {model} (CKKS key {manifest.key_id}, {manifest.size:,} values in {len(manifest.names)} "
         f"tensors) into {output}; it stays at this site")  # fmt: skip


@app.command("approve", help="Allow a task wheel or Flower App to run on this site's data, after showing what it is.")
def approve_cmd(
    path: Annotated[Path, typer.Argument(help="The task's wheel (.whl), or a Flower App (.fab file or folder).")],
    kit: KitDir = Path(),
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking (for scripts).")] = False,
) -> None:
    chosen = candidate(path)
    out.print("To approve")
    for label, value in chosen.lines():  # plain lines: a hash is never shortened to fit a table
        out.print(f"  {label:<16} {value}")
    for entry, shared in sharing_modules(kit, chosen):
        revoke_hint = f"`flowerbed supernode revoke {entry.sha256[:12]}` removes the old one"
        warn(f"it has module {', '.join(shared)} like approved {entry.name} {entry.version} (sha256 {entry.sha256}): "
             f"each run imports only its own wheel; {revoke_hint}")  # fmt: skip
    missing = _missing_dependencies(chosen.requires)
    if missing:
        warn(f"not installed here: {', '.join(missing)}; install them from the kit's wheels before a run")
    if not yes:
        if not sys.stdin.isatty():
            raise FlowerbedError("approval needs a yes: run it in a terminal, or pass --yes")
        if not typer.confirm(f"Approve {chosen.name} {chosen.version} for this site's data?", default=False):
            raise FlowerbedError("not approved: nothing changed")
    entry, new = approve(kit, chosen)
    what = f"{entry.kind} {entry.name} {entry.version} (sha256 {entry.sha256})"
    out.print(f"approved {what} in {kit / SITE_FILE}" if new else f"{what} was approved already")


@app.command("approvals", help="List the tasks and apps this site has approved.")
def approvals_cmd(kit: KitDir = Path()) -> None:
    config = load_site(kit)
    rows = ([a.kind, a.name, a.version, a.sha256, a.approved_at] for a in config.approved)
    out.print(table(f"Approved at {config.site}", ["kind", "name", "version", "sha256", "approved"], rows))
    builtin = "allowed" if config.allow_builtin_tasks else "not allowed (allow_builtin_tasks = false)"
    out.print(f"built-in tasks: {builtin}")


@app.command("privacy", help="Show this site's privacy budget and what each run has spent of it.")
def privacy_cmd(kit: KitDir = Path()) -> None:
    config = load_site(kit)
    budget = config.privacy
    if budget is None:
        out.print(f"{config.site} sets no privacy budget: runs train without DP-SGD unless they ask for it "
                  "(add [privacy] to site.toml, docs/privacy.md)")  # fmt: skip
    else:
        per = "per run" if budget.scope == "run" else "in all runs together"
        out.print(f"{config.site} spends at most epsilon {budget.epsilon:g} (delta {budget.delta:g}) {per}")
    rows = ([s.key, s.rounds, f"{s.epsilon:.3f}", "-" if s.budget is None else f"{s.budget:g}", s.set_by, s.last]
            for s in ledgers((kit / config.workdir).resolve() / "privacy"))  # fmt: skip
    out.print(table("Spent (UTC)", ["ledger", "rounds", "epsilon spent", "of", "set by", "last round"], rows))


@app.command("revoke", help="Withdraw an approval (by name, or by the first 8+ digits of its sha256).")
def revoke_cmd(
    what: Annotated[str, typer.Argument(help="Task or app name, or sha256 prefix.")], kit: KitDir = Path()
) -> None:
    for entry in revoke(kit, what):
        out.print(f"revoked {entry.kind} {entry.name} {entry.version} (sha256 {entry.sha256})")
