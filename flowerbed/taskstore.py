"""The coordinator's own-task wheels (``FED_DIR/tasks/``): which wheel a run's ``--task`` means."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flowerbed.artifacts import WheelInfo, read_task_wheel
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.task import BUILTIN


@dataclass(frozen=True)
class Chosen:
    """The task a run uses: its name, and for an own task the sha256 and the wheel it is imported from."""

    name: str
    sha256: str = ""
    wheel: Path | None = None


def stored(layout: FederationLayout) -> list[WheelInfo]:
    """The task wheels in ``tasks/``, newest first."""
    wheels = sorted(layout.tasks.glob("*.whl"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [read_task_wheel(path) for path in wheels]


def add(layout: FederationLayout, wheel: Path) -> WheelInfo:
    """Copy a task wheel into ``tasks/`` (a wheel of the same file name is replaced)."""
    read_task_wheel(wheel)  # refuses what is not a task wheel before anything is copied
    layout.tasks.mkdir(parents=True, exist_ok=True)
    target = layout.tasks / wheel.name
    if wheel.resolve() != target.resolve():
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(wheel, tmp)
        tmp.replace(target)
    return read_task_wheel(target)


def choose(layout: FederationLayout, task: str, sha256: str = "") -> Chosen:
    """What ``task`` (a built-in name, an own task's name, or a wheel's path) and ``sha256`` mean here.

    An own task by name is the newest wheel in ``tasks/`` that names it, or the one with ``sha256``.
    """
    if task.endswith(".whl"):
        info = add(layout, Path(task).expanduser())
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
