"""The preflight loads the site's data as round 1 would: bad data is named before the SuperNode starts.

Real files, the real CLI; against the shared coordinator for the built-in tasks, and in a real kit
whose data steward approved an own task (and allows no built-in one) for the own-task path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flowerbed.artifacts import sha256_file
from flowerbed.config import SITE_FILE, SiteKitConfig, load_toml_model, save_toml_model
from flowerbed.errors import ExitCode
from flowerbed.task import load_wheel_task
from tests.conftest import RunningFederation, assert_clean_error, make_config, make_federation, run_cli
from tests.test_supernode import start_args
from tests.test_taskpkg import build_wheel


@pytest.mark.federation
def test_bad_data_is_named_at_preflight(running: RunningFederation, tmp_path: Path) -> None:
    lay = running.layout
    good = running.data.site_files["inst-a"]
    header = good.read_text().splitlines()[0]
    cases = {
        "empty.csv": ("", "needs a header row and at least one data row"),
        "no-target.csv": ("a,b\n1,2\n3,4\n", "no 'target' column"),
        "one-row.csv": (header + "\n" + good.read_text().splitlines()[1] + "\n", "needs at least 2 samples, has 1"),
    }
    for name, (text, why) in cases.items():
        (tmp_path / name).write_text(text)
        result = run_cli(*start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), tmp_path / name),
                         "--preflight-only")  # fmt: skip
        assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, f"preflight: data path: {tmp_path / name} cannot be "
                           "trained on: built-in tasks:", why)  # fmt: skip
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "no-images" / "cats").mkdir(parents=True)
    (tmp_path / "no-images" / "cats" / "notes.txt").write_text("not an image")
    for folder in ("empty-folder", "no-images"):
        result = run_cli(*start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), tmp_path / folder),
                         "--preflight-only")  # fmt: skip
        assert_clean_error(result, ExitCode.PREFLIGHT_FAILED, f"{tmp_path / folder} cannot be trained on")
    ok = run_cli(*start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), good), "--preflight-only")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "training and" in " ".join(ok.stdout.split()) and "as a built-in task reads it" in ok.stdout


@pytest.mark.federation
def test_an_own_task_reads_the_data_at_preflight(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "task")
    config = make_config("datacheck", ["inst-a"], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    built = run_cli("kit", "build", "-d", str(layout.root), "--task", str(wheel), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    kit = tmp_path / "kit"
    shutil.copytree(layout.root / "kits" / "inst-a", kit)
    site = load_toml_model(kit / SITE_FILE, SiteKitConfig)
    save_toml_model(kit / SITE_FILE, site.model_copy(update={"allow_builtin_tasks": False}))
    assert run_cli("supernode", "approve", f"tasks/{wheel.name}", "--yes", cwd=kit).returncode == 0
    task = load_wheel_task(wheel, "ct-triage", sha256_file(wheel))  # its example data, in its own format
    data = task.example_data(tmp_path / "example")
    fine = run_cli("supernode", "start", "--kit", ".", "--data", str(data), "--preflight-only", cwd=kit)
    flat = " ".join(fine.stdout.split())
    assert "task ct-triage: 96 training and 24 validation examples" in flat, flat  # read by the task itself
    (tmp_path / "no-target.csv").write_text("a,b\n1,2\n3,4\n")
    bad = run_cli("supernode", "start", "--kit", ".", "--data", str(tmp_path / "no-target.csv"), "--preflight-only",
                  cwd=kit)  # fmt: skip
    assert_clean_error(bad, ExitCode.PREFLIGHT_FAILED, "cannot be trained on: task ct-triage:",
                       "needs a header with a 'target' column")  # fmt: skip
    assert "built-in tasks:" not in bad.stdout + bad.stderr  # this site allows none
