"""`flowerbed task new / check / build`: a study's task package from scaffold to an installable wheel.

Real commands, real files, a real pip build (offline), the scaffold's own test run by pytest, and the
built wheel installed where flowerbed finds the task by its entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from flowerbed.superlink.stack import start_stack
from tests.conftest import SITES, assert_clean_error, make_config, make_federation, run_cli, supervised_sites


def test_a_new_task_is_checked_built_and_found_by_name(tmp_path: Path) -> None:
    build_and_install(tmp_path)


def build_and_install(tmp_path: Path) -> Path:
    """`task new`, `task check`, the scaffold's own test, `task build`, then the wheel installed in a folder."""
    made = run_cli("task", "new", "ct-triage", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / "ct-triage"
    assert {p.name for p in pkg.iterdir()} >= {"pyproject.toml", "README.md", "tests", "flowerbed_task_ct_triage"}

    checked = run_cli("task", "check", str(pkg))
    text = " ".join(checked.stdout.split())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "task check passed" in text and "auroc" in text and "sensitivity" in text

    own_test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                              capture_output=True, text=True, cwd=pkg, env={**os.environ, "PYTHONPATH": str(pkg)},
                              timeout=300, check=False)  # fmt: skip
    assert own_test.returncode == 0, own_test.stdout[-2000:]

    built = run_cli("task", "build", str(pkg), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = Path(next(line for line in built.stdout.splitlines() if line.endswith(".whl")).strip())
    digest = next(line.split()[1] for line in built.stdout.splitlines() if line.startswith("sha256 "))
    assert digest == hashlib.sha256(wheel.read_bytes()).hexdigest()

    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)  # fmt: skip
    found = subprocess.run(
        [sys.executable, "-c", "from flowerbed.task import load_task; print(load_task('ct-triage').name)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120, check=False,
    )  # fmt: skip
    assert found.stdout.strip() == "ct-triage", found.stderr
    return target


def test_a_federated_run_of_an_own_task_is_driven_by_its_own_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built wheel installed where coordinator and sites import it; `task = "ct-triage"`, target AUROC."""
    target = build_and_install(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(target))  # every process the kit starts inherits it: "installed"
    config = make_config("own-task", SITES[:2], min_nodes=2, max_rounds=3, patience=10)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    stack = start_stack(layout, config)
    try:
        with supervised_sites(layout, f"localhost:{config.superlink.port}",
                              {s: data.site_files[s] for s in SITES[:2]}, tmp_path):  # fmt: skip
            result = run_cli("run", "-d", str(layout.root), "--name", "own", "--task", "ct-triage",
                             "--target-metric", "auroc", "--target-value", "0.99", timeout=600)  # fmt: skip
    finally:
        stack.stop()
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text
    rows = [json.loads(line) for line in (layout.runs / "own" / "history.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "train"]
    assert trained and all({"eval-auroc", "eval-sensitivity", "train-loss"} <= set(r["metrics"]) for r in trained)
    assert "auroc" in text and "sensitivity" in text  # columns of the run table
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--task", "nope"), ExitCode.ERROR,
                       "no task 'nope' in this environment")  # refused before anything is submitted  # fmt: skip
    summary = json.loads((layout.runs / "own" / "summary.json").read_text())
    best_auroc = max(r["metrics"]["eval-auroc"] for r in rows if "eval-auroc" in r["metrics"])
    assert summary["stop_reason"] == ("target-reached" if best_auroc >= 0.99 else "max-rounds"), (summary, best_auroc)


def test_task_mistakes_are_one_line(tmp_path: Path) -> None:
    assert_clean_error(run_cli("task", "new", "CT Triage", "--dir", str(tmp_path)), ExitCode.ERROR,
                       "use 2-41 lower-case letters, digits and hyphens")  # fmt: skip
    assert_clean_error(run_cli("task", "check", str(tmp_path)), ExitCode.ERROR, "is not a task package")
    assert run_cli("task", "new", "broken", "--dir", str(tmp_path)).returncode == 0
    module = tmp_path / "broken" / "flowerbed_task_broken" / "task.py"
    module.write_text("raise ImportError('no module named nibabel')\n")
    assert_clean_error(run_cli("task", "check", str(tmp_path / "broken")), ExitCode.ERROR,
                       "importing flowerbed_task_broken.task:task", "no module named nibabel")  # fmt: skip
