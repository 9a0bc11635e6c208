"""Integrity: the code a site approved is the code that runs, and approval shows everything that runs.

Real wheels built by the kit's own `task build`, a real federation with a warm executor, the
site's real audit trail; and hand-made wheels that carry a .pth file, a console script, another
entry point and a native extension, shown to the data steward by `flowerbed supernode approve`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flowerbed.artifacts import read_task_wheel, sha256_file
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
from tests.test_taskpkg import site_toml

MODULE = "flowerbed_task_ct_triage"
BUILD_MARKER = """
import os as _os
if _os.environ.get("TASK_MARKER"):  # proof for the tests: this build's module was imported, in this folder
    from pathlib import Path as _Path
    (_Path.cwd() / f"task-imported-{{_os.getpid()}}-{build}").write_text("{build}")
"""


def _variant(base: Path, out: Path, build: str, *, version: str = "0.1.0", task: str = "ct-triage") -> Path:
    """A build of the scaffolded ct-triage package: its own version, task name, import marker and metric."""
    pkg = out / build
    subprocess.run(["cp", "-r", str(base), str(pkg)], check=True)
    pyproject = pkg / "pyproject.toml"
    text = pyproject.read_text().replace('version = "0.1.0"', f'version = "{version}"')
    if task != "ct-triage":  # another task, another distribution, the same Python module
        text = text.replace('name = "flowerbed-task-ct-triage"', f'name = "flowerbed-task-{task}"')
        text = text.replace("ct-triage = ", f"{task} = ")
    pyproject.write_text(text)
    module = pkg / MODULE / "task.py"
    code = module.read_text().replace('name = "ct-triage"', f'name = "{task}"')
    code = code.replace('"auroc": auroc,', f'"auroc": auroc, "{build}-metric": 1.0,')
    module.write_text(code + BUILD_MARKER.format(build=build))
    built = run_cli("task", "build", str(pkg), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return Path(next(line for line in built.stdout.splitlines() if line.endswith(".whl")).strip())


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 (0.1.0), v2 (0.2.0), `other-study` and v1b (0.1.0 again): four wheels, one top-level module."""
    root = tmp_path_factory.mktemp("variants")
    assert run_cli("task", "new", "ct-triage", "--dir", str(root)).returncode == 0
    base = root / "ct-triage"
    return {
        "v1": _variant(base, root, "v1"),
        "v2": _variant(base, root, "v2", version="0.2.0"),
        "other": _variant(base, root, "other", task="other-study"),
        "v1b": _variant(base, root, "v1b"),  # another build of 0.1.0: the same file name, other bytes
    }


def _builds(folder: Path, skip_pids: frozenset[str] = frozenset()) -> set[str]:
    """The builds whose module was imported in ``folder`` (``skip_pids``: the warm executor's own preload)."""
    found = (p.name.removeprefix("task-imported-").split("-", 1) for p in folder.glob("task-imported-*"))
    return {build for pid, build in found if pid not in skip_pids}


@pytest.mark.federation
def test_one_process_imports_each_wheel_from_itself(variants: dict[str, Path], tmp_path: Path) -> None:
    """v1, then v2 and the other task with the same module, in one process: each gets its own code."""
    script = f"""
import json, sys
from pathlib import Path
from flowerbed.task import load_wheel_task, imported_code
from flowerbed.artifacts import sha256_file
out = {{}}
for build, path in {json.dumps({k: str(v) for k, v in variants.items() if k != "v1b"})}.items():
    name = "other-study" if build == "other" else "ct-triage"
    task = load_wheel_task(Path(path), name, sha256_file(Path(path)))
    out[build] = [task.name, task.train.__code__.co_filename, imported_code(sha256_file(Path(path))).sha256]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "TASK_MARKER": "1"}, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded["v1"][0] == "ct-triage" and loaded["v2"][0] == "ct-triage" and loaded["other"][0] == "other-study"
    for build, path in list(variants.items())[:3]:  # each task's code lives in the private copy of its own wheel
        assert f"task-{sha256_file(path)[:12]}-" in loaded[build][1], loaded
    assert len({v[2] for v in loaded.values()}) == 3  # three different code digests
    assert _builds(tmp_path) == {"v1", "v2", "other"}


@pytest.mark.federation
def test_the_approved_build_runs_not_another_with_its_module(
    variants: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site approved v1, v2 and another task reusing v1's module: every run imports exactly its wheel.

    The warm executor preloads v1 only (the other two share its module); a run of v2 writes v2's
    marker and reports v2's metric, never v1's, and the site's trail names v2's wheel and code hash.
    """
    monkeypatch.setenv("TASK_MARKER", "1")
    site = SITES[0]
    config = make_config("integrity", [site], min_nodes=1, max_rounds=1, patience=10)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    kit = site_toml(tmp_path / "kits" / site, site, config)
    for build in ("v1", "v2", "other"):
        approved = run_cli("supernode", "approve", str(variants[build]), "--yes", cwd=kit.parent)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        if build != "v1":  # the steward is told, with the command that removes the old one
            text = " ".join(approved.stderr.split())
            assert f"it has module {MODULE} like approved ct-triage 0.1.0" in text, text
            assert "flowerbed supernode revoke" in text
    work, at_coordinator = tmp_path / "work", tmp_path / "coordinator"
    at_coordinator.mkdir()
    results = {}
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {site: data.site_files[site]}, work,
                              site_files={site: kit}):  # fmt: skip
            for build in ("v2", "v1", "other"):
                for marker in (work / site).glob("task-imported-*"):
                    marker.unlink()
                result = run_cli("run", "-d", str(layout.root), "--name", build, "--task", str(variants[build]),
                                 timeout=600, cwd=at_coordinator)  # fmt: skip
                log = (work / site / "logs" / "supernode.log").read_text()
                executors = frozenset(re.findall(r"warm ClientApp executor ready \(pid (\d+)\)", log))
                results[build] = (result, _builds(work / site, executors), executors)
    assert "1 approved task(s) imported once" in log and "not preloaded" in log and "shares module" in log
    trail = [json.loads(line) for line in (work / site / "audit.jsonl").read_text().splitlines()]
    imported = [r["details"] for r in trail if r["kind"] == "task" and r["details"].get("event") == "imported"]
    for build in ("v2", "v1", "other"):
        result, seen, _ = results[build]
        assert result.returncode == 0, result.stdout + result.stderr
        # This run's tasks imported this build and only it (v1 was imported once, up front, by the executor).
        assert seen == (set() if build == "v1" else {build}), (build, seen)
        rows = [json.loads(line) for line in (layout.runs / build / "history.jsonl").read_text().splitlines()]
        trained = [r for r in rows if r["kind"] == "train"]
        assert trained and all(f"eval-{build}-metric" in r["metrics"] for r in trained), trained
        digest = sha256_file(variants[build])
        mine = [r for r in imported if r["task_sha256"] == digest]
        assert mine, (build, imported)
        files = {f"{MODULE}/__init__.py", f"{MODULE}/task.py"}
        assert all(set(r["files"]) == files and re.fullmatch("[0-9a-f]{64}", r["code_sha256"]) for r in mine)
    codes = {r["task_sha256"]: r["code_sha256"] for r in imported}
    assert len(set(codes.values())) == 3  # three wheels, three different imported codes


def _wheel(folder: Path, files: dict[str, str], entry_points: str) -> Path:
    """A py3-none-any wheel written by hand, with a correct RECORD."""
    dist = "flowerbed_task_tricky-0.1.0.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: flowerbed-task-tricky\nVersion: 0.1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": entry_points,
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    path = folder / "flowerbed_task_tricky-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def test_approve_shows_every_file_that_runs_on_its_own(tmp_path: Path) -> None:
    """A .pth file, a console script, a second entry point, a native extension and a shadowing module: all marked."""
    wheel = _wheel(
        tmp_path,
        {
            "flowerbed_task_tricky/__init__.py": "",
            "flowerbed_task_tricky/task.py": "task = None\n",
            "flowerbed_task_tricky/_speed.cpython-311-x86_64-linux-gnu.so": "ELF",
            "zz_tricky_hook.pth": "import os\n",
            "json/__init__.py": "",  # shadows the standard library's json
            "flowerbed_task_tricky-0.1.0.data/scripts/tricky-setup": "#!/bin/sh\n",
        },
        "[flowerbed.tasks]\ntricky = flowerbed_task_tricky.task:task\n\n[console_scripts]\ntricky = flowerbed_task_tricky.task:main\n\n"
        "[pytest11]\ntricky = flowerbed_task_tricky.task\n",
    )
    info = read_task_wheel(wheel)
    assert info.modules == ("flowerbed_task_tricky", "json")
    kit = site_toml(tmp_path / "kit", "inst-a", make_config("tricky", ["inst-a"], min_nodes=1))
    shown = run_cli("supernode", "approve", str(wheel), "--yes", cwd=kit.parent, env={"COLUMNS": "80"})
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.split() == ["sha256", info.sha256] for line in lines), shown.stdout  # never shortened
    text = " ".join(shown.stdout.split())
    assert "…" not in shown.stdout
    for needle in ("! .pth file (runs at every Python start) zz_tricky_hook.pth",
                   "! console script tricky = flowerbed_task_tricky.task:main",
                   "! entry point (pytest11) tricky = flowerbed_task_tricky.task",
                   "! native extension flowerbed_task_tricky/_speed.cpython-311-x86_64-linux-gnu.so",
                   "! script flowerbed_task_tricky-0.1.0.data/scripts/tricky-setup",
                   "json (! shadows an installed module)", "runs on its own 5 file(s), marked !"):  # fmt: skip
        assert needle in text, (needle, shown.stdout)


@pytest.mark.federation
def test_the_coordinator_keeps_the_wheel_it_announced(variants: dict[str, Path], tmp_path: Path) -> None:
    """Another build under the same file name is refused with both hashes; --replace is audited; tampering is named."""
    config = make_config("store", [SITES[0]], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    v1, v1b = variants["v1"], variants["v1b"]
    assert v1.name == v1b.name and sha256_file(v1) != sha256_file(v1b)
    first = run_cli("run", "-d", str(layout.root), "--task", str(v1), cwd=tmp_path)  # stored, then: no SuperLink
    assert_clean_error(first, ExitCode.ERROR, "was never started")
    stored = layout.tasks / v1.name
    assert sha256_file(stored) == sha256_file(v1)
    for args in (("run", "-d", str(layout.root), "--task", str(v1b)), ("kit", "build", "-d", str(layout.root),
                                                                        "--task", str(v1b))):  # fmt: skip
        assert_clean_error(run_cli(*args, cwd=tmp_path), ExitCode.ERROR,
                           f"is another build of flowerbed-task-ct-triage 0.1.0 (stored sha256 {sha256_file(v1)}, "
                           f"given {sha256_file(v1b)})", "--replace")  # fmt: skip
        assert sha256_file(stored) == sha256_file(v1)  # untouched
    assert not (layout.root / "kits").exists()  # the refused kit build wrote nothing
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--task", "ct-triage", "--replace", cwd=tmp_path),
                       ExitCode.ERROR, "--replace goes with --task FILE.whl")  # fmt: skip
    replaced = run_cli("run", "-d", str(layout.root), "--task", str(v1b), "--replace", cwd=tmp_path)
    assert_clean_error(replaced, ExitCode.ERROR, "was never started")
    assert sha256_file(stored) == sha256_file(v1b)
    trail = [json.loads(line)["details"] for line in layout.audit.read_text().splitlines()]
    assert {"event": "task wheel replaced", "old_sha256": sha256_file(v1), "sha256": sha256_file(v1b)}.items() <= {
        k: v for r in trail if r.get("event") == "task wheel replaced" for k, v in r.items()
    }.items()
    stored.write_bytes(v1.read_bytes())  # swapped on disk behind the kit's back
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--task", "ct-triage", cwd=tmp_path), ExitCode.ERROR,
                       f"changed after it was added (sha256 then {sha256_file(v1b)}, now {sha256_file(v1)})")  # fmt: skip


@pytest.mark.federation
def test_a_run_name_never_leaves_runs(tmp_path: Path) -> None:
    """`--name ../escape`, an absolute name or a hidden one: one line, nothing written, nothing submitted."""
    config = make_config("names", [SITES[0]], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for bad in ("../escape", str(tmp_path / "elsewhere"), ".hidden", "a/b", "Run 1"):
        result = run_cli("run", "-d", str(layout.root), "--name", bad, cwd=tmp_path)
        assert_clean_error(result, ExitCode.ERROR, f"run name {bad!r}: use lower-case letters")
    bad = "../escape"
    for args in (("run", "--resume", bad), ("run", "--app", str(tmp_path), "--name", bad), ("runs", "follow", bad),
                 ("report", bad)):  # fmt: skip
        assert_clean_error(run_cli(*args, "-d", str(layout.root), cwd=tmp_path), ExitCode.ERROR, f"run name {bad!r}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
