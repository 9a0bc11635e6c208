"""Load a site's data as round 1 would, before the SuperNode starts (the preflight's data check).

Built-in tasks read a CSV file or class folders (:func:`flowerbed.clientapp.data.load_site_data`);
an approved own task reads it with its own ``load_data``, in a child process (``python -m
flowerbed.supernode.datacheck``), so that its code never runs inside the supervisor. The data
passes when a task the site may run can load it; otherwise every task's reason is given.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flowerbed.config import SITE_FILE, SiteKitConfig, load_toml_model
from flowerbed.errors import FlowerbedError

TIMEOUT_S = 300.0


def builtin_summary(path: Path) -> str:
    """What a built-in task reads from ``path`` (raises :class:`DataError` naming what is wrong)."""
    from flowerbed.clientapp.data import DataError, find_csv, load_site_data  # torch: only when data is checked

    folders = sum(1 for d in path.iterdir() if d.is_dir()) if path.is_dir() else 0
    classes = max(folders, 2) if path.is_dir() and find_csv(path) is None else 10_000  # the run sets it; any fits
    data = load_site_data(str(path), num_features=None, num_classes=classes, image_size=32,
                          validation_fraction=0.2, seed=0)  # fmt: skip
    if data.num_train < 1:
        raise DataError(f"{path}: nothing is left to train on after the validation split")
    return f"{data.kind}: {data.num_train} training and {len(data.validation)} validation examples"


def own_task_summary(wheel: Path, name: str, sha256: str, path: Path) -> str:
    """What approved task ``name`` reads from ``path``, in a child process; raises FlowerbedError with its reason."""
    try:
        done = subprocess.run([sys.executable, "-m", "flowerbed.supernode.datacheck", str(wheel), name, sha256,
                               str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise FlowerbedError(f"task {name}: loading {path} took longer than {TIMEOUT_S:.0f} s") from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FlowerbedError(f"task {name}: its data check ended without an answer ({done.stderr[-300:]})") from None
    if not answer.get("ok"):
        raise FlowerbedError(f"task {name}: {answer.get('error')}")
    return f"task {name}: {answer['train']} training and {answer['validation']} validation examples"


def check_site_data(path: Path, site_file: Path | None) -> tuple[bool, str]:
    """(passes, detail): the data loads for a task this site may run, or every task's reason it does not."""
    from flowerbed.clientapp.data import DataError

    config = load_toml_model(site_file, SiteKitConfig) if site_file is not None else None
    problems = []
    if config is None or config.allow_builtin_tasks:
        try:
            return True, f"{path} ({builtin_summary(path)}, as a built-in task reads it)"
        except DataError as exc:
            problems.append(f"built-in tasks: {exc}")
    root = site_file.parent if site_file is not None else Path()
    for entry in config.approved if config is not None else []:
        if entry.kind != "task" or not entry.file:
            continue
        try:
            return True, f"{path} ({own_task_summary(root / entry.file, entry.name, entry.sha256, path)})"
        except FlowerbedError as exc:
            problems.append(exc.message)
    return False, "; ".join(problems) or f"no task this site may run can read {path} (see {SITE_FILE})"


def main() -> None:
    """``WHEEL NAME SHA256 DATA``: one JSON line, the approved task's reading of DATA."""
    from flowerbed.task import load_wheel_task, task_config

    wheel, name, sha256, data = sys.argv[1:5]
    answer: dict[str, object]
    try:
        task = load_wheel_task(Path(wheel), name, sha256)
        train, validation = task.load_data(Path(data), task_config(task, {}))
        answer = {"ok": True, "train": len(train), "validation": len(validation)}
        if not len(train):
            answer = {"ok": False, "error": f"{data}: no training examples"}
    except FlowerbedError as exc:
        answer = {"ok": False, "error": exc.message}
    except Exception as exc:  # noqa: BLE001 - the task's own code: said in one line
        answer = {"ok": False, "error": f"load_data failed: {type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
