"""`flowerbed task new / check / build`: a study's task package from scaffold to an installable wheel.

Real commands, real files, a real pip build (offline), the scaffold's own test run by pytest; then
the wheel approved at one site and not at another, in a real federation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed.config import SITE_FILE, FederationConfig, SiteKitConfig, load_toml_model, save_toml_model
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from tests.conftest import (
    SITES,
    assert_clean_error,
    coordinator,
    make_config,
    make_federation,
    run_cli,
    supervised_sites,
)

MARKER = """
import os as _os
if _os.environ.get("TASK_MARKER"):  # proof for the tests: this module was imported, in this folder
    from pathlib import Path as _Path
    (_Path.cwd() / f"task-imported-{_os.getpid()}").write_text("imported")
    _train = Task.train

    def _train_and_say(self, model, data, config):  # proof: the epochs a site trained with
        (_Path.cwd() / f"task-epochs-{_os.getpid()}").write_text(str(config.local_epochs))
        return _train(self, model, data, config)

    Task.train = _train_and_say
"""


@pytest.mark.federation
def test_a_new_task_is_checked_and_built_into_a_wheel(tmp_path: Path) -> None:
    build_wheel(tmp_path)


def build_wheel(tmp_path: Path, marker: bool = False) -> Path:
    """`task new`, `task check`, the scaffold's own test, `task build`: the wheel and its printed sha256."""
    made = run_cli("task", "new", "ct-triage", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    pkg = tmp_path / "ct-triage"
    assert {p.name for p in pkg.iterdir()} >= {"pyproject.toml", "README.md", "tests", "flowerbed_task_ct_triage"}
    if marker:
        module = pkg / "flowerbed_task_ct_triage" / "task.py"
        module.write_text(module.read_text() + MARKER)

    checked = run_cli("task", "check", str(pkg))
    text = " ".join(checked.stdout.split())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "task check passed" in text and "auroc" in text and "sensitivity" in text
    assert "pooled auroc" in text  # the template pools its AUROC over the sites (statistics + pooled)

    own_test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                              capture_output=True, text=True, cwd=pkg, env={**os.environ, "PYTHONPATH": str(pkg)},
                              timeout=300, check=False)  # fmt: skip
    assert own_test.returncode == 0, own_test.stdout[-2000:]

    built = run_cli("task", "build", str(pkg), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = Path(next(line for line in built.stdout.splitlines() if line.endswith(".whl")).strip())
    digest = next(line.split()[1] for line in built.stdout.splitlines() if line.startswith("sha256 "))
    assert digest == hashlib.sha256(wheel.read_bytes()).hexdigest()
    return wheel


def site_toml(folder: Path, site: str, config: FederationConfig) -> Path:
    """A site's site.toml as its kit holds it (no approvals yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SITE_FILE
    save_toml_model(path, SiteKitConfig(federation=config.name, site=site, superlink_address="localhost"))
    return path


def summary_kinds(out_dir: Path) -> dict[str, str]:
    """How the run combined each metric, as its summary says (pooled or weighted mean)."""
    return dict(json.loads((out_dir / "summary.json").read_text())["metric_kinds"])


def markers(folder: Path) -> list[Path]:
    return sorted(folder.glob("task-imported-*"))


@pytest.mark.federation
def test_an_approved_own_task_trains_and_an_unapproved_site_refuses_it_unimported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Site A approved the wheel, site B did not: A trains (AUROC drives the run), B refuses before import.

    Then A's approved copy is tampered with: A refuses too, and no code of the task runs anywhere.
    """
    wheel = build_wheel(tmp_path, marker=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setenv("TASK_MARKER", "1")
    a, b = SITES[:2]
    config = make_config("own-task", [a, b], min_nodes=1, max_rounds=3, patience=10)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    kits = {site: site_toml(tmp_path / "kits" / site, site, config) for site in (a, b)}

    approved = run_cli("supernode", "approve", str(wheel), "--yes", cwd=kits[a].parent)  # the default --kit .
    text = " ".join(approved.stdout.split())
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert all(s in text for s in ("ct-triage", "0.1.0", digest, "none beyond flowerbed", "approved task ct-triage"))
    again = run_cli("supernode", "approve", str(wheel), "--yes", "--kit", str(kits[a].parent))
    assert "was approved already" in " ".join(again.stdout.split())
    listed = run_cli("supernode", "approvals", "--kit", str(kits[a].parent))
    assert digest in listed.stdout and "built-in tasks: allowed" in listed.stdout
    assert_clean_error(run_cli("supernode", "approve", str(wheel), "--kit", str(kits[b].parent)), ExitCode.ERROR,
                       "approval needs a yes")  # no terminal, no --yes: nothing approved  # fmt: skip

    work = tmp_path / "work"
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {s: data.site_files[s] for s in (a, b)},
                              work, site_files=kits):  # fmt: skip
            # In a folder of its own: the coordinator imports the task too, and its marker lands there.
            result = run_cli("run", "-d", str(layout.root), "--name", "own", "--task", str(wheel),
                             "--target-metric", "auroc", "--target-value", "0.99", timeout=600,
                             cwd=tmp_path)  # fmt: skip
            assert markers(work / a) and not markers(work / b)
            # The template's default of 3 epochs held at the site ([run] of the test's federation.toml
            # sets no local_epochs), as the run's settings table said.
            assert {p.read_text() for p in (work / a).glob("task-epochs-*")} == {"3"}
            before = markers(work / a)
            stored = kits[a].parent / "approved" / f"{digest[:12]}-{wheel.name}"
            stored.write_bytes(stored.read_bytes() + b"tampered")  # the approved copy, modified after approval
            tampered = run_cli("run", "-d", str(layout.root), "--name", "tampered", "--task", "ct-triage",
                               "--max-rounds", "1", timeout=600, cwd=tmp_path)  # fmt: skip
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text
    refusal = f"site {b} refused task ct-triage (sha256 {digest}): not approved here"
    assert refusal in text and "flowerbed supernode approve" in text, text  # shown per site by `flowerbed run`
    rows = [json.loads(line) for line in (layout.runs / "own" / "history.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "train"]
    assert trained and all(r["sites"] == [a] for r in trained)
    assert all({"eval-auroc", "eval-sensitivity", "train-loss"} <= set(r["metrics"]) for r in trained)
    assert all(any(refusal in e for e in r["errors"]) for r in trained)
    # The report's evidence: when A approved this build (its site.toml), and A's class balance.
    when = next(x.approved_at for x in load_toml_model(kits[a], SiteKitConfig).approved if x.sha256 == digest)
    assert when and all(r["approved"] == {a: when} for r in trained), [r["approved"] for r in trained]
    assert all(sum(r["classes"][a].values()) == r["examples"][a] and set(r["classes"][a]) == {"0", "1"}
               for r in trained)  # fmt: skip
    assert "auroc" in text and "sensitivity" in text  # columns of the run table
    assert "local_epochs 3 task default" in " ".join(result.stdout.replace("│", " ").split())
    assert "(pooled)" in text and summary_kinds(layout.runs / "own")["auroc"] == "pooled"
    assert summary_kinds(layout.runs / "own")["sensitivity"] == "weighted mean"
    kept = {row["key"]: row for row in json.loads((layout.runs / "own" / "settings.json").read_text())}
    assert kept["local_epochs"]["source"] == "task default" and kept["target_metric"]["source"] == "flag"
    summary = json.loads((layout.runs / "own" / "summary.json").read_text())
    best_auroc = max(r["metrics"]["eval-auroc"] for r in rows if "eval-auroc" in r["metrics"])
    assert summary["stop_reason"] == ("target-reached" if best_auroc >= 0.99 else "max-rounds"), (summary, best_auroc)
    assert "REFUSED" in (work / b / "logs" / "supernode.log").read_text()  # logged at the site
    # A's warm executor imported the approved wheel once, up front; each task still passed the gate.
    assert "1 approved task(s) imported once" in (work / a / "logs" / "supernode.log").read_text()

    tampered_text = " ".join((tampered.stdout + tampered.stderr).split())
    assert tampered.returncode == ExitCode.RUN_FAILED, tampered_text
    assert f"site {a} refused task ct-triage (sha256 {digest}): the approved wheel" in tampered_text
    assert "was modified since" in tampered_text and f"site {b} refused task ct-triage" in tampered_text
    assert markers(work / a) == before and not markers(work / b)  # no code of the refused task ran
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--task", "nope", cwd=tmp_path), ExitCode.ERROR,
                       "no wheel of task 'nope'")  # refused before anything is submitted  # fmt: skip


def test_task_mistakes_are_one_line(tmp_path: Path) -> None:
    assert_clean_error(run_cli("task", "new", "CT Triage", "--dir", str(tmp_path)), ExitCode.ERROR,
                       "use 2-41 lower-case letters, digits and hyphens")  # fmt: skip
    assert_clean_error(run_cli("task", "check", str(tmp_path)), ExitCode.ERROR, "is not a task package")
    assert run_cli("task", "new", "broken", "--dir", str(tmp_path)).returncode == 0
    module = tmp_path / "broken" / "flowerbed_task_broken" / "task.py"
    module.write_text("raise ImportError('no module named nibabel')\n")
    assert_clean_error(run_cli("task", "check", str(tmp_path / "broken")), ExitCode.ERROR,
                       "importing flowerbed_task_broken.task:task", "no module named nibabel")  # fmt: skip


def test_task_check_teaches(tmp_path: Path) -> None:
    """`task check` names the task's function and line that failed, sums up the data it loaded for each
    file, and refuses data that would spoil a run: labels out of range, one class, NaNs."""
    assert run_cli("task", "new", "wine-study", "--dir", str(tmp_path)).returncode == 0
    pkg = tmp_path / "wine-study"
    module = pkg / "flowerbed_task_wine_study" / "task.py"
    good = module.read_text()

    data = tmp_path / "data"
    data.mkdir()

    def csv_file(name: str, labels: list[str], nan_row: int | None = None) -> Path:
        rows = [",".join(["nan" if i == nan_row and j == 0 else f"{(i * 7 + j) % 5 - 2}" for j in range(30)]
                         + [label]) for i, label in enumerate(labels)]  # fmt: skip
        path = data / name
        path.write_text(",".join([*(f"f{j}" for j in range(30)), "target"]) + "\n" + "\n".join(rows) + "\n")
        return path

    fine = csv_file("fine.csv", ["0", "1"] * 30)
    checked = run_cli("task", "check", str(pkg), "--data", str(fine))
    flat = " ".join(checked.stdout.replace("│", " ").split())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "the data load_data read" in flat and re.search(r"train 48 30 0: \d+, 1: \d+ 0 0\.\.1", flat), flat

    bad = [csv_file("labels.csv", ["0", "1", "2"] * 20), csv_file("one.csv", ["1"] * 60),
           csv_file("nan.csv", ["0", "1"] * 30, nan_row=3)]  # fmt: skip
    result = run_cli("task", "check", str(pkg), *(a for path in bad for a in ("--data", str(path))))
    assert_clean_error(result, ExitCode.ERROR, "task check found", "labels 0..2 are outside the model's 2 classes",
                       "one.csv: train: a single class (1)", "NaN or infinite feature value(s)")  # fmt: skip

    # The task's own code fails: its function and line, one line; --traceback adds the whole trace.
    module.write_text(good.replace("        rows = list(csv.DictReader(handle))",
                                   "        rows = list(csv.DictReader(handle))\n        rows[0]['nope']"))  # fmt: skip
    line = next(i for i, text in enumerate(module.read_text().splitlines(), 1) if "rows[0]['nope']" in text)
    failed = run_cli("task", "check", str(pkg))
    assert_clean_error(failed, ExitCode.ERROR, f"task wine-study: load_data failed at flowerbed_task_wine_study/"
                       f"task.py:{line}: KeyError: 'nope'", "--traceback")  # fmt: skip
    traced = run_cli("task", "check", str(pkg), "--traceback")
    assert "Traceback (most recent call last)" in traced.stderr and "rows[0]['nope']" in traced.stderr

    module.write_text(good.replace('name = "wine-study"', 'name = "wine_study_v2"'))
    assert_clean_error(run_cli("task", "check", str(pkg)), ExitCode.ERROR, "its name is 'wine_study_v2' but "
                       "pyproject.toml's entry point names it 'wine-study'")  # fmt: skip
