"""The coordinator's own-task wheels (``FED_DIR/tasks/``): which wheel a run's ``--task`` means."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from flowerbed import audit
from flowerbed.artifacts import WheelInfo, read_task_wheel, sha256_file
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.task import BUILTIN


@dataclass(frozen=True)
class Chosen:
    """The task a run uses: its name, and for an own task the sha256 and the wheel it is imported from."""

    name: str
    sha256: str = ""
    wheel: Path | None = None


INDEX = "index.json"  # wheel file name -> the sha256 it had when it was added


def _index(layout: FederationLayout) -> dict[str, str]:
    path = layout.tasks / INDEX
    try:
        data = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        raise FlowerbedError(f"{path} is damaged: delete it and add the task wheels again with --task") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_index(layout: FederationLayout, index: dict[str, str]) -> None:
    path = layout.tasks / INDEX
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def stored(layout: FederationLayout) -> list[WheelInfo]:
    """The task wheels in ``tasks/``, newest first; each must still have the sha256 it was added with."""
    wheels = sorted(layout.tasks.glob("*.whl"), key=lambda p: p.stat().st_mtime, reverse=True)
    index = _index(layout)
    infos = [read_task_wheel(path) for path in wheels]
    unknown = {info.path.name: info.sha256 for info in infos if info.path.name not in index}
    if unknown:  # placed by hand (or by an older flowerbed): recorded as they are now
        _save_index(layout, index | unknown)
        index |= unknown
    for info in infos:
        if index[info.path.name] != info.sha256:
            raise FlowerbedError(
                f"{info.path} changed after it was added (sha256 then {index[info.path.name]}, now {info.sha256}): "
                f"runs and kits would ship other code; add the wheel you mean with `--task FILE.whl --replace`"
            )
    return infos


def check_new(layout: FederationLayout, wheel: Path, *, replace: bool = False) -> tuple[WheelInfo, list[WheelInfo]]:
    """The wheel to add and the stored builds it would replace; another build refused unless ``replace``."""
    info = read_task_wheel(wheel)  # refuses what is not a task wheel before anything is copied
    target = layout.tasks / wheel.name
    same = [w for w in stored(layout) if (w.dist, w.version) == (info.dist, info.version) or w.path == target]
    other = [w for w in same if w.sha256 != info.sha256]
    if other and not replace:
        old = other[0]
        raise FlowerbedError(
            f"{old.path} is another build of {info.dist} {info.version} (stored sha256 {old.sha256}, given "
            f"{info.sha256}): give the new one a new version, or pass --replace to replace the stored one"
        )
    return info, other


def add(layout: FederationLayout, wheel: Path, *, replace: bool = False) -> WheelInfo:
    """Copy a task wheel into ``tasks/``, keyed by its sha256.

    Another build of the same name and version already stored is refused, naming both hashes,
    unless ``replace``; a replacement is written into the coordinator's audit trail.
    """
    info, other = check_new(layout, wheel, replace=replace)
    layout.tasks.mkdir(parents=True, exist_ok=True)
    target = layout.tasks / wheel.name
    if wheel.resolve() != target.resolve():
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(wheel, tmp)
        if sha256_file(tmp) != info.sha256:
            tmp.unlink()
            raise FlowerbedError(f"{wheel} changed while it was copied: add it again")
        for old in other:
            old.path.unlink(missing_ok=True)
        tmp.replace(target)
    index = {k: v for k, v in _index(layout).items() if k not in {o.path.name for o in other}}
    _save_index(layout, index | {target.name: info.sha256})
    for old in other:
        audit.append(layout.audit, audit.TASK, "coordinator", event="task wheel replaced", dist=info.dist,
                     version=info.version, old_sha256=old.sha256, sha256=info.sha256, file=target.name)  # fmt: skip
    return read_task_wheel(target)


def choose(layout: FederationLayout, task: str, sha256: str = "", *, replace: bool = False) -> Chosen:
    """What ``task`` (a built-in name, an own task's name, or a wheel's path) and ``sha256`` mean here.

    An own task by name is the newest wheel in ``tasks/`` that names it, or the one with ``sha256``.
    """
    if task.endswith(".whl"):
        info = add(layout, Path(task).expanduser(), replace=replace)
        (name,) = info.tasks
        return Chosen(name, info.sha256, info.path)
    if not sha256 and task in BUILTIN:
        return Chosen(task)
    found = [w for w in stored(layout) if task in w.tasks and (not sha256 or w.sha256 == sha256)]
    if not found:
        which = f"with sha256 {sha256}" if sha256 else "for it"
        raise FlowerbedError(
            f"no wheel of task {task!r} {which} in {layout.tasks} (built-in tasks: {', '.join(sorted(BUILTIN))}): "
            "pass the wheel, `--task path/to/TASK.whl` (`flowerbed task build` makes it)"
        )
    return Chosen(task, found[0].sha256, found[0].path)
