"""A site's approvals: which task wheels and Flower Apps may touch its data, by sha256.

The data steward approves with ``flowerbed supernode approve WHEEL_OR_APP`` after seeing the name,
version, hash and dependencies; the entry goes to ``[[approved]]`` in the kit's site.toml and an
approved wheel is kept in the kit's ``approved/`` folder. :func:`decide` is asked for every task
the SuperNode runs, before any code of the run is imported (see :mod:`flowerbed.supernode.gate`).
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowerbed import audit
from flowerbed.artifacts import FabInfo, WheelInfo, read_app, read_task_wheel, sha256_file
from flowerbed.config import SITE_FILE, Approval, RunSettings, SiteKitConfig, load_toml_model, save_toml_model
from flowerbed.deploy.bundle import TASKS_DIR
from flowerbed.errors import FlowerbedError
from flowerbed.protocol import task_name
from flowerbed.task import BUILTIN

APPROVED_DIR = "approved"


@dataclass(frozen=True)
class Candidate:
    """What the data steward is asked to approve."""

    kind: str  # task or app
    name: str
    version: str
    sha256: str
    requires: list[str]
    source: Path
    wheel: WheelInfo | None = None

    def lines(self) -> list[tuple[str, str]]:
        """What the data steward reads before saying yes: one (label, value) a line, nothing shortened."""
        rows = [
            ("kind", "task wheel" if self.kind == "task" else "Flower App"),
            ("name", self.name),
            ("version", self.version),
            ("sha256", self.sha256),
            ("dependencies", ", ".join(self.requires) or "none beyond flowerbed"),
            ("file", str(self.source)),
        ]
        if self.wheel is not None:
            rows.append(("modules", ", ".join(_module_notes(self.wheel.modules)) or "none"))
            rows.append(
                (
                    "runs on its own",
                    "nothing" if not self.wheel.autorun else f"{len(self.wheel.autorun)} file(s), marked !",
                )
            )
            rows.extend(("  ! " + what, name) for what, name in self.wheel.autorun)
        return rows


def _module_notes(modules: tuple[str, ...]) -> list[str]:
    """Each top-level module, marked where an installed module of that name would be shadowed by it."""
    import importlib.util

    notes = []
    for name in modules:
        try:
            installed = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            installed = False
        notes.append(f"{name} (! shadows an installed module)" if installed else name)
    return notes


def sharing_modules(kit_root: Path, chosen: Candidate) -> list[tuple[Approval, list[str]]]:
    """The approved task wheels of another hash that have a top-level module of ``chosen`` too."""
    if chosen.wheel is None:
        return []
    found = []
    for entry in load_site(kit_root).approved:
        if entry.kind != "task" or entry.sha256 == chosen.sha256 or not (kit_root / entry.file).is_file():
            continue
        try:
            modules = read_task_wheel(kit_root / entry.file).modules
        except FlowerbedError:
            continue
        shared = sorted(set(modules) & set(chosen.wheel.modules))
        if shared:
            found.append((entry, shared))
    return found


def candidate(path: Path) -> Candidate:
    """Read a task wheel (.whl) or a Flower App (.fab or folder) without importing any of it."""
    if path.suffix == ".whl":
        info = read_task_wheel(path)
        (name,) = info.tasks
        return Candidate("task", name, info.version, info.sha256, info.requires, path, info)
    fab = read_app(path)
    if fab.is_kit_app:
        raise FlowerbedError(f"{path} is flowerbed's own app: it needs no approval (its tasks do)")
    return Candidate("app", fab.name, fab.version, fab.sha256, fab.requires, path)


def load_site(kit_root: Path) -> SiteKitConfig:
    """The site's site.toml in the unpacked kit ``kit_root``, validated."""
    return load_toml_model(kit_root / SITE_FILE, SiteKitConfig, missing="pass the unpacked site kit with --kit")


def site_audit(kit_root: Path, config: SiteKitConfig) -> Path:
    """The site's audit trail: ``audit.jsonl`` in the SuperNode's work folder of the kit."""
    return (kit_root / config.workdir).resolve() / audit.AUDIT_FILE


def approve(kit_root: Path, chosen: Candidate) -> tuple[Approval, bool]:
    """Add ``chosen`` to the kit's site.toml (a wheel is kept under approved/); False if it was there."""
    config = load_site(kit_root)
    for entry in config.approved:
        if entry.sha256 == chosen.sha256:
            return entry, False
    file = ""
    if chosen.wheel is not None:
        folder = kit_root / APPROVED_DIR
        folder.mkdir(exist_ok=True)
        kept = folder / f"{chosen.sha256[:12]}-{chosen.source.name}"
        tmp = kept.with_suffix(".tmp")
        shutil.copyfile(chosen.source, tmp)
        if sha256_file(tmp) != chosen.sha256:
            tmp.unlink()
            raise FlowerbedError(f"{chosen.source} changed while it was copied: approve it again")
        tmp.replace(kept)
        file = kept.relative_to(kit_root).as_posix()
    entry = Approval(
        kind=chosen.kind,
        name=chosen.name,
        version=chosen.version,
        sha256=chosen.sha256,
        file=file,
        requires=chosen.requires,
        approved_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    config.approved.append(entry)
    save_toml_model(kit_root / SITE_FILE, config)
    audit.append(site_audit(kit_root, config), audit.APPROVAL, "data steward", event="approved", kind=entry.kind,
                 name=entry.name, version=entry.version, sha256=entry.sha256)  # fmt: skip
    return entry, True


def revoke(kit_root: Path, what: str) -> list[Approval]:
    """Remove the approvals whose sha256 starts with ``what`` or whose name is ``what``."""
    config = load_site(kit_root)
    gone = [a for a in config.approved if a.name == what or (len(what) >= 8 and a.sha256.startswith(what))]
    if not gone:
        known = ", ".join(f"{a.name} {a.sha256[:12]}" for a in config.approved) or "none"
        raise FlowerbedError(f"nothing approved here matches {what!r} (approved: {known})")
    config.approved = [a for a in config.approved if a not in gone]
    save_toml_model(kit_root / SITE_FILE, config)
    for entry in gone:
        audit.append(site_audit(kit_root, config), audit.APPROVAL, "data steward", event="revoked", kind=entry.kind,
                     name=entry.name, version=entry.version, sha256=entry.sha256)  # fmt: skip
    for entry in gone:
        if entry.file:
            (kit_root / entry.file).unlink(missing_ok=True)
    return gone


@dataclass(frozen=True)
class Decision:
    """Whether a run's code may run at this site; ``reason`` is the refusal or what runs."""

    allowed: bool
    reason: str
    sha256: str = ""
    wheel: Path | None = None


def _approve_hint(kind: str, name: str, kit_root: Path | None = None, sha256: str = "") -> str:
    """The command that approves it: with the file's path when the kit carries it (``tasks/``)."""
    shipped = sorted((kit_root / TASKS_DIR).glob("*.whl")) if kit_root is not None and sha256 else []
    for wheel in shipped:
        if sha256_file(wheel) == sha256:
            return f"to approve it: `flowerbed supernode approve {TASKS_DIR}/{wheel.name}` in the kit folder"
    what = f"{name}'s wheel (.whl)" if kind == "task" else f"the {name} app (.fab or folder)"
    return f"to approve it, the data steward runs `flowerbed supernode approve` on {what}"


def decide(site_file: Path | None, site: str, fab: FabInfo, run_config: dict[str, Any]) -> Decision:
    """May this run's code run here? Asked before any of it is imported.

    ``site_file``: the kit's site.toml (None: no kit, so only the built-in tasks run).
    """
    config = load_toml_model(site_file, SiteKitConfig) if site_file is not None else None
    approved = config.approved if config is not None else []
    kit_root = site_file.parent if site_file is not None else Path()
    if not fab.is_kit_app:
        if any(a.kind == "app" and a.sha256 == fab.sha256 for a in approved):
            return Decision(True, f"approved app {fab.name} {fab.version} (sha256 {fab.sha256})", fab.sha256)
        return Decision(
            False,
            f"site {site} refused app {fab.name} {fab.version} (sha256 {fab.sha256}): not approved here; "
            + _approve_hint("app", fab.name),
            fab.sha256,
        )
    try:
        settings = RunSettings.from_run_config(run_config)
    except ValidationError as exc:
        return Decision(False, f"site {site} refused the run: its settings are invalid ({exc.error_count()} problems)")
    name, sha = task_name(settings), settings.task_sha256
    if not sha:
        if name in BUILTIN and (config is None or config.allow_builtin_tasks):
            return Decision(True, f"built-in task {name}")
        why = "built-in tasks are not allowed here (allow_builtin_tasks)" if name in BUILTIN else "no such task"
        return Decision(False, f"site {site} refused task {name}: {why}")
    entry = next((a for a in approved if a.kind == "task" and a.sha256 == sha), None)
    if entry is None or entry.name != name:
        other = [a.sha256 for a in approved if a.kind == "task" and a.name == name]
        why = f"another build of {name} is approved here (sha256 {other[0]})" if other else "not approved here"
        hint = _approve_hint("task", name, kit_root if site_file is not None else None, sha)
        return Decision(False, f"site {site} refused task {name} (sha256 {sha}): {why}; {hint}", sha)
    wheel = kit_root / entry.file
    if not wheel.is_file():
        return Decision(False, f"site {site} refused task {name} (sha256 {sha}): its approved wheel {wheel} is gone; "
                        + _approve_hint("task", name), sha)  # fmt: skip
    now = sha256_file(wheel)
    if now != sha:
        return Decision(False, f"site {site} refused task {name} (sha256 {sha}): the approved wheel {entry.file} was "
                        f"modified since (sha256 now {now}); {_approve_hint('task', name)}", sha)  # fmt: skip
    return Decision(True, f"approved task {name} {entry.version} (sha256 {sha})", sha, wheel)
