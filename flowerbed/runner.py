"""``flowerbed run``: build the Flower App manifest, submit it, follow its progress."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from flowerbed import audit, taskstore
from flowerbed.artifacts import KIT_CLIENTAPP, KIT_SERVERAPP, sha256_bytes
from flowerbed.config import FROM_FLAG, FederationConfig, RunSettings, resolve
from flowerbed.diskspace import MB, device_of, free_bytes
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.flower import HookError
from flowerbed.layout import FederationLayout
from flowerbed.probes import tcp_open
from flowerbed.protocol import task_name
from flowerbed.runfolder import (
    APP_MANIFEST,
    RESUMED,
    RESUMING_FILE,
    RUN_ID_FILE,
    SUMMARY,
    TRAIN,
    ended,
    read_rows,
    request_stop,
    run_folders,
    run_id_of,
    serverapp_alive,
    write_settings,
)
from flowerbed.serverapp.resume import RESUME_KEY, plan_resume
from flowerbed.superlink import control, flwrcli
from flowerbed.task import RUN_TASK_WHEEL, Setting, effective_settings, load_task, task_config

APP_NAME = "flowerbed-app"
FINISHED = "finished"


def write_app_manifest(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """A Flower App that is a manifest only: the code ships inside the installed kit.

    Every site runs the same pinned flowerbed, so no code is pushed to the sites.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "flowerbed's ServerApp and ClientApp, installed at every site",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "flowerbed",
                    "components": {
                        "serverapp": KIT_SERVERAPP,
                        "clientapp": KIT_CLIENTAPP,
                    },
                    "config": run_config,
                }
            }
        },
    }
    path = app_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@dataclass(frozen=True)
class RunHandle:
    """A submitted run: its Flower run id and its folder."""

    run_id: int
    out_dir: Path


def check_superlink(layout: FederationLayout, control_port: int | None) -> None:
    """Raise a one-line error with the start command when the local SuperLink does not answer."""
    start_hint = f"`flowerbed superlink start -d {layout.root}` (another terminal, or the service)"
    if not (layout.flwr_home / "config.toml").is_file():
        raise FlowerbedError(f"the SuperLink of {layout.root} was never started: start it with {start_hint}")
    if control_port is not None and not tcp_open("127.0.0.1", control_port):
        raise FlowerbedError(
            f"the SuperLink is not running (nothing answers on 127.0.0.1:{control_port}): start it with {start_hint}"
        )


def _submit(layout: FederationLayout, out_dir: Path, run_config: dict[str, Any]) -> int:
    write_app_manifest(out_dir / "app", run_config)
    run_id = control.start_run(layout.flwr_home, out_dir / "app")
    (out_dir / RUN_ID_FILE).write_text(str(run_id), encoding="utf-8")
    return run_id


def submit(
    layout: FederationLayout,
    settings: RunSettings,
    name: str | None = None,
    *,
    control_port: int | None = None,
    task_wheel: Path | None = None,
    effective: list[Setting] | None = None,
) -> RunHandle:
    """Write the manifest with the validated settings and submit it to the local SuperLink.

    ``control_port``: the SuperLink's loopback port, checked first so that a stopped coordinator is
    named as such. ``task_wheel``: the own task's wheel, kept in the run folder for the ServerApp
    (and for a resume). ``effective``: the settings as the task sees them, kept in the run folder.
    A run that could not be submitted leaves no run folder behind.
    """
    check_superlink(layout, control_port)
    stamp = name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    out_dir = layout.run_dir(stamp)
    if out_dir.exists():
        raise FlowerbedError(f"{out_dir} already exists: choose another --name, or `--resume {stamp}` to go on")
    try:
        out_dir.mkdir(parents=True)
        if task_wheel is not None:
            shutil.copyfile(task_wheel, out_dir / RUN_TASK_WHEEL)
        if effective:
            write_settings(out_dir, [(s.key, s.value, s.source) for s in effective])
        run_id = _submit(layout, out_dir, settings.to_run_config() | {"output-dir": str(out_dir)})
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    audit.anchor_log(layout.audit, layout.gateway_access_log, "coordinator")
    settings_sha256 = sha256_bytes(json.dumps(settings.model_dump(), sort_keys=True).encode())
    audit.append(layout.audit, audit.RUN, "coordinator", event="submitted", run=stamp, flower_run_id=run_id,
                 task=settings.task or "built-in", task_sha256=settings.task_sha256, strategy=settings.strategy,
                 dp=settings.dp, settings_sha256=settings_sha256)  # fmt: skip
    return RunHandle(run_id=run_id, out_dir=out_dir)


def model_bytes(model: Any) -> int:
    """The bytes of a torch model's state (parameters and buffers): one checkpoint, one update."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


HELD_NOTE_BYTES = 1024 * MB  # a round's updates held at once above this: said before the run


def memory_warning(model: Any, settings: RunSettings, sites: int) -> str | None:
    """A warning when this run's rounds hold every update at once and they add up to more than a GB
    (FedAvg, FedProx and FedAdam add each update to a running sum as it arrives: no warning)."""
    from flowerbed.serverapp.fold import held_why

    why = held_why(settings)
    size = model_bytes(model)
    if why is None or size * sites < HELD_NOTE_BYTES:
        return None
    return (f"{why}: the coordinator holds up to {sites} updates of {size / MB:.0f} MB at once "
            f"({sites * size / MB / 1024:.1f} GB) in each round; fedavg, fedprox and fedadam add each update "
            "as it arrives instead")  # fmt: skip


@dataclass
class Prepared:
    """A run made ready to submit: the task it uses, its settings, and what the user should hear first."""

    chosen: taskstore.Chosen
    settings: RunSettings
    warnings: list[str]
    effective: list[Setting] = field(default_factory=list)  # as the task sees them, with sources (empty: resumed)


def space_warning(runs: Path, model: Any, settings: RunSettings) -> str | None:
    """A warning when the run's checkpoints may not fit where runs/ lives (None: they fit)."""
    size = model_bytes(model)
    copies = settings.keep_checkpoints + 3  # the round checkpoints kept, the one being written, best.pt, final
    free = free_bytes(runs)
    if free >= size * copies + 16 * MB:
        return None
    return (f"only {free / MB:.1f} MB free on {device_of(runs)} ({runs}): this run's checkpoints need about "
            f"{size * copies / MB:.1f} MB ({copies} models of {size / MB:.1f} MB); free space, or lower "
            "keep_checkpoints in federation.toml")  # fmt: skip


def prepare(
    layout: FederationLayout,
    config: FederationConfig,
    overrides: dict[str, Any],
    *,
    task: str | None = None,
    task_settings: dict[str, Any] | None = None,
    base: RunSettings | None = None,
    replace: bool = False,
    check_task: bool = True,
) -> Prepared:
    """The one preparation of a run (``flowerbed run`` and the notebook): the task chosen, the settings
    resolved against federation.toml (``base``: a resumed run's own) and the sites, and the task loaded
    once here (``check_task``), so that a task that cannot load is refused before any site sees it.

    ``overrides``: run settings given by the user (None values are left out).
    """
    base = base or config.run
    chosen = taskstore.choose(layout, task or task_name(base), "" if task else base.task_sha256, replace=replace)
    given = {
        "task": chosen.name,
        "task_sha256": chosen.sha256,
        "task_settings": base.task_settings | (task_settings or {}),
    }
    run_settings = resolve(base, given | overrides)
    settings = resolve(config, {"run": run_settings}).run  # min-nodes is checked against the sites too
    sources = base.sources() | {key: FROM_FLAG for key, value in overrides.items() if value is not None}
    sources |= {f"task_settings.{key}": FROM_FLAG for key in task_settings or {}}
    settings = settings.with_sources(sources)
    from flowerbed.serverapp.strategies import client_dp_warning  # Flower's strategies: not on every command

    warnings = [w for w in (client_dp_warning(settings, len(config.sites)),) if w]
    if settings.secure_aggregation == "ckks":  # the coordinator adds ciphertexts with TenSEAL: said before submit
        from flowerbed.ckks import tenseal

        tenseal()
    effective: list[Setting] = []
    if check_task:
        loaded = load_task(chosen.name, chosen.sha256, chosen.wheel)
        effective, unused = effective_settings(loaded, settings)
        if unused:
            warnings.append(f"task {chosen.name} has no setting {', '.join(unused)}: the value given "
                            f"({', '.join(f'{k} from {sources[k]}' for k in unused)}) is not used")  # fmt: skip
        model = loaded.model(task_config(loaded, settings.to_run_config()))
        warnings += [w for w in (space_warning(layout.runs, model, settings),
                                 memory_warning(model, settings, len(config.sites))) if w]  # fmt: skip
    return Prepared(chosen, settings, warnings, effective)


def run_folder(layout: FederationLayout, name: str) -> Path:
    """``runs/NAME`` of this federation, or a one-line error listing the runs there are."""
    out_dir = layout.run_dir(name)
    if not (out_dir / APP_MANIFEST).is_file():
        known = [p.name for p in run_folders(layout.runs)]
        raise FlowerbedError(
            f"no run {name!r} in {layout.runs}: " + (f"runs there are {', '.join(known)}" if known else "none yet")
        )
    return out_dir


def stored_settings(out_dir: Path) -> RunSettings:
    """The settings a run was submitted with (from its manifest)."""
    data = tomllib.loads((out_dir / "app" / "pyproject.toml").read_text("utf-8"))
    return RunSettings.from_run_config(data["tool"]["flwr"]["app"]["config"])


def resume(
    layout: FederationLayout,
    name: str,
    settings: RunSettings | None = None,
    *,
    control_port: int | None = None,
    why: str = "",
) -> RunHandle:
    """Go on with run ``name`` from its last checkpoint, as a new Flower run writing to the same folder.

    ``settings``: replaces the stored ones (e.g. more rounds); refused while its ServerApp still runs.
    """
    check_superlink(layout, control_port)
    out_dir = run_folder(layout, name)
    with resume_lock(out_dir):
        if serverapp_alive(out_dir):
            raise FlowerbedError(f"run {name} is still running: follow it with `flowerbed runs follow {name}`")
        plan_resume(out_dir)  # refuses what cannot be resumed (completed, no checkpoint) before submitting
        old = run_id_of(out_dir)
        config = (settings or stored_settings(out_dir)).to_run_config()
        summary, parked = out_dir / SUMMARY, out_dir / "summary.previous.json"
        if summary.exists():
            summary.replace(parked)  # the run has not ended any more; put back if the submission fails
        try:
            run_id = _submit(
                layout, out_dir, config | {"output-dir": str(out_dir), RESUME_KEY: True, "resume-why": why}
            )
        except BaseException:
            if parked.exists() and not summary.exists():
                parked.replace(summary)
            raise
    if old is not None:
        with contextlib.suppress(FlowerbedError):
            flwrcli.stop_run(layout.flwr_home, old)  # its ServerApp is gone; Flower would wait a minute
    audit.append(layout.audit, audit.RUN, "coordinator", event="resumed", run=name, flower_run_id=run_id,
                 previous_flower_run_id=old, why=why.removeprefix("; "))  # fmt: skip
    return RunHandle(run_id=run_id, out_dir=out_dir)


def stop(layout: FederationLayout, name: str, why: str = "") -> Path:
    """Ask run ``name`` to end after its current round (its final evaluation follows, the run completes
    with ``stopped-by-coordinator``); refused for a run that has ended. Returns its folder."""
    out_dir = run_folder(layout, name)
    summary = ended(out_dir)
    if summary is not None:
        raise FlowerbedError(f"run {name} has ended already ({summary.get('status')}, {summary.get('stop_reason')})")
    request_stop(out_dir, why or "stopped by the coordinator")
    audit.append(layout.audit, audit.RUN, "coordinator", event="stop requested", run=name, why=why)
    return out_dir


@contextlib.contextmanager
def resume_lock(out_dir: Path, stale_s: float = 300.0) -> Iterator[None]:
    """One resume of a run folder at a time (the coordinator's and a terminal's could race)."""
    lock = out_dir / RESUMING_FILE
    for _ in range(2):
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:
            if time.time() - lock.stat().st_mtime < stale_s:
                raise FlowerbedError(
                    f"run {out_dir.name} is being resumed already (by the coordinator or another terminal): "
                    f"follow it with `flowerbed runs follow {out_dir.name}`"
                ) from None
            lock.unlink(missing_ok=True)  # left by a resume that was killed
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunResult:
    """How a followed run ended: Flower's status, its rows and its summary."""

    status: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    run_id: int = 0


INTERRUPTED = "interrupted"


def follow(
    layout: FederationLayout,
    handle: RunHandle,
    *,
    on_rows: Callable[[list[dict[str, Any]]], None] = lambda _rows: None,
    on_note: Callable[[str], None] = lambda _msg: None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 1.0,
    resume_grace_s: float = 45.0,
    unreachable_s: float = 180.0,
) -> RunResult:
    """Poll history and run status until the run ends (or ``timeout_s``).

    A resume (by the coordinator or another terminal) gives the folder a new Flower run, which is
    followed on. A ServerApp that died is waited for ``resume_grace_s`` (the coordinator resumes
    such runs by itself), and a SuperLink restarting for ``unreachable_s``.
    """
    end = time.monotonic() + timeout_s
    status = "unknown"
    run_id = handle.run_id
    interrupted_at: float | None = None
    unreachable_at: float | None = None
    while time.monotonic() < end:
        on_rows(read_rows(handle.out_dir))
        latest = run_id_of(handle.out_dir)
        if latest is not None and latest != run_id:
            run_id, interrupted_at = latest, None
            on_note(f"the run was resumed and goes on as Flower run {run_id}")
        decided = ended(handle.out_dir)
        if decided is not None and decided.get("status") != "completed" and latest == run_id:
            status = f"{FINISHED}:{decided.get('status')}"  # the ServerApp decided: no need to wait for Flower
            break
        try:
            status = control.run_status(layout.flwr_home, run_id)
        except HookError:
            raise  # this Flower lacks what the kit asks with: said as such, never "not answered"
        except FlowerbedError as exc:
            unreachable_at = unreachable_at or time.monotonic()
            if time.monotonic() - unreachable_at > unreachable_s:
                raise FlowerbedError(
                    f"run {run_id} was submitted, but the SuperLink has not answered for {unreachable_s:.0f} s "
                    f"({exc.message}); when it is back, follow it with `flowerbed runs follow "
                    f"{handle.out_dir.name}`"
                ) from None
            time.sleep(poll_s)
            continue
        unreachable_at = None
        summary = ended(handle.out_dir)
        if summary is not None and status.startswith(FINISHED):
            break
        if summary is None and (status.startswith(FINISHED) or serverapp_alive(handle.out_dir) is False):
            if interrupted_at is None:  # a resume stops the old Flower run first: wait for the new one
                interrupted_at = time.monotonic()
                on_note(f"run {run_id}: its ServerApp stopped without a result; waiting for a resume")
            if time.monotonic() - interrupted_at > resume_grace_s:
                status = status if status.endswith("stopped") else INTERRUPTED
                break
        time.sleep(poll_s)
    else:
        raise FlowerbedError(
            f"run {run_id} still {status} after {timeout_s:.0f} s; "
            f"it goes on: follow it with `flowerbed runs follow {handle.out_dir.name}`"
        )
    rows = read_rows(handle.out_dir)
    on_rows(rows)
    return RunResult(status=status, rows=rows, summary=ended(handle.out_dir) or {}, run_id=run_id)


def check_result(result: RunResult, handle: RunHandle) -> None:
    """Raise a run-failed error when the run did not complete as flowerbed defines it."""
    run_id = result.run_id or handle.run_id
    if result.summary.get("status") == "completed" and result.status.endswith("completed"):
        return
    name = handle.out_dir.name
    if not result.summary and result.status == INTERRUPTED:
        reason = f"its ServerApp stopped without a result; go on with `flowerbed run --resume {name}`"
    elif not result.summary and result.status.endswith("stopped"):
        reason = f"it was stopped; go on with `flowerbed run --resume {name}`"
    else:
        reason = result.summary.get("stop_reason") or f"Flower reports {result.status}"
    raise FlowerbedError(
        f"run {run_id} failed: {reason} (history: {handle.out_dir})",
        exit_code=ExitCode.RUN_FAILED,
    )


@dataclass(frozen=True)
class RunInfo:
    """One run folder, as `flowerbed runs` shows it (read from files; Flower is not asked)."""

    name: str
    run_id: int | None
    status: str  # completed, failed, stopped, running, interrupted, starting
    rounds: int
    resumes: int
    best_accuracy: float | None
    stop_reason: str


def run_overview(layout: FederationLayout) -> list[RunInfo]:
    """Every run folder of the federation, oldest first."""
    infos = []
    folders = sorted(run_folders(layout.runs), key=lambda p: p.stat().st_mtime)
    for out_dir in folders:
        rows = read_rows(out_dir)
        summary = ended(out_dir)
        alive = serverapp_alive(out_dir)
        if summary is not None:
            status = str(summary.get("status", "unknown"))
        else:
            status = {True: "running", False: INTERRUPTED, None: "starting"}[alive]
        infos.append(
            RunInfo(
                name=out_dir.name,
                run_id=run_id_of(out_dir),
                status=status,
                rounds=max((int(r["round"]) for r in rows if r.get("kind") == TRAIN), default=0),
                resumes=sum(r.get("kind") == RESUMED for r in rows),
                best_accuracy=(summary or {}).get("best_eval_accuracy"),
                stop_reason=str((summary or {}).get("stop_reason", "")),
            )
        )
    return infos
