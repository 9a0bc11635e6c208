"""Conda env files (generated, no drift, parseable), systemd units, and an offline wheel bundle
installed into a fresh venv with every index disabled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from flowerbed.config import Site
from flowerbed.deploy import install
from flowerbed.deploy.bundle import bundle_wheels
from flowerbed.deploy.condaenv import ROLES, pip_part, render
from flowerbed.deploy.kit import coordinator_unit, site_unit
from flowerbed.errors import ExitCode, FlowerbedError
from tests.conftest import assert_clean_error, make_config, make_federation, run_cli

CONDA_DIR = Path(__file__).parent.parent / "deploy" / "conda"


@pytest.mark.parametrize("role", ROLES)
def test_committed_env_file_matches_generator(role: str) -> None:
    committed = (CONDA_DIR / f"{role}.yml").read_text()
    assert committed == render(role), f"run `flowerbed env conda --role {role} --write deploy/conda`"  # type: ignore[arg-type]
    printed = run_cli("env", "conda", "--role", role)
    assert printed.returncode == 0 and printed.stdout == committed


@pytest.mark.federation
@pytest.mark.parametrize("role", ROLES)
def test_env_file_parses(role: str) -> None:
    data = yaml.safe_load((CONDA_DIR / f"{role}.yml").read_text())
    assert data["name"] == f"flowerbed-{role}"
    assert data["channels"] == ["conda-forge"]
    deps = data["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    assert ("nginx" in deps) == (role == "superlink")
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == pip_part(role)  # type: ignore[arg-type]
    assert any(p.startswith("flwr>=1.42") or p.startswith("flwr<1.43") for p in pip)
    torch = [p for p in pip if p.startswith("torch==")]
    assert torch == (["torch==2.13.0"] if role == "supernode-cuda" else ["torch==2.13.0+cpu"])


def test_unknown_role_is_refused() -> None:
    result = run_cli("env", "conda", "--role", "gpu")
    assert_clean_error(
        result,
        ExitCode.INVALID_CONFIG,
        "Invalid value for '--role': 'gpu' is not one of 'superlink', 'supernode-cpu', 'supernode-cuda' (see `flowerbed env conda --help`)",
    )
    assert len(result.stderr.strip().splitlines()) == 1


def packages(role: str) -> list[str]:
    data = yaml.safe_load((CONDA_DIR / f"{role}.yml").read_text())
    pip = next(d["pip"] for d in data["dependencies"] if isinstance(d, dict))
    return [p for p in pip if not p.startswith("--")]


def task_with_a_dependency(tmp_path: Path) -> Path:
    """An own task whose module imports tabulate (not a flowerbed dependency): its wheel."""
    assert run_cli("task", "new", "tab-task", "--dir", str(tmp_path)).returncode == 0
    pkg = tmp_path / "tab-task"
    pyproject = pkg / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("dependencies = []", 'dependencies = ["tabulate>=0.9"]'))
    module = pkg / "flowerbed_task_tab_task" / "task.py"
    module.write_text(module.read_text().replace("import csv\n", "import csv\n\nimport tabulate  # noqa: F401\n", 1))
    built = run_cli("task", "build", str(pkg), timeout=300)
    assert built.returncode == 0, built.stderr
    return next((pkg / "dist").glob("*.whl"))


@pytest.mark.federation
def test_offline_bundle_installs_env_pip_part_into_fresh_venv(tmp_path: Path) -> None:
    """The pip part of supernode-cpu.yml (= superlink.yml's) from the bundle, with no index at all.

    The CPU index line of the env file is a pip option, not a package: the bundle is made without
    it because this machine reaches only PyPI, where the local CPU torch wheel is found. An own task
    with a dependency rides along: its wheel in the kit's tasks/, its dependency in the bundle.
    """
    assert packages("superlink") == packages("supernode-cpu")
    task = task_with_a_dependency(tmp_path)
    # --platform linux: pip resolves for the target's tags, not this host's (what a coordinator does
    # for a VM of another Linux); every manylinux tag the target accepts is passed.
    # PyTorch's CPU index out of reach (a closed port on loopback): the fallback to the default index,
    # said in one line; this machine's default index has the CPU build (checked after the install).
    said: list[str] = []
    bundle = bundle_wheels(tmp_path / "wheels", platform="linux", python_version="3.11",
                           torch_index="https://127.0.0.1:9/whl/cpu", tasks=[task], he=True, report=said.append)  # fmt: skip
    assert any("https://127.0.0.1:9/whl/cpu (PyTorch's CPU builds) is not reachable" in line for line in said), said
    assert any(w.name.startswith("uv-") for w in bundle.wheels)  # the fast installer rides along
    assert bundle.requirements.read_text().split() == [
        *packages("supernode-cpu"),
        "tabulate>=0.9",
        "tenseal>=0.3.18,<0.4",
    ]
    names = {w.name.split("-")[0].lower() for w in bundle.wheels}
    assert {"flwr", "torch", "flowerbed", "typer", "pydantic", "tabulate", "tenseal"} <= names
    assert (bundle.folder / "tasks" / task.name).read_bytes() == task.read_bytes()
    conda = run_cli("env", "conda", "--role", "supernode-cpu", "--task", str(task))
    assert '- "tabulate>=0.9"' in conda.stdout and task.name in conda.stdout
    # The coordinator's path: the bundle goes into every kit; the site installs from the kit folder
    # with the one documented command, no index at all.
    config = make_config("offline", ["site-x", "site-w"], min_nodes=1)
    config.sites[1] = Site(name="site-w", platform="windows")
    layout = make_federation(tmp_path / "fed", config)
    assert json.loads((bundle.folder / "bundle.json").read_text())["system"] == "linux"
    # Each kit carries only its own system's wheels: a Windows site needs a Windows bundle.
    assert_clean_error(run_cli("kit", "build", "-d", str(layout.root), "--bundle", str(bundle.folder)), ExitCode.ERROR,
                       "site site-w runs windows (platform in federation.toml) but no bundle is for windows",
                       "flowerbed bundle wheels --platform windows --out DIR")  # fmt: skip
    lean = tmp_path / "lean-bundle"  # a bundle made without --task: it lacks the task's dependency
    lean.mkdir()
    (lean / "requirements.txt").write_text("\n".join(packages("supernode-cpu")) + "\n")
    shutil.copyfile(next(w for w in bundle.wheels if w.name.startswith("typer")), lean / "typer-0-py3-none-any.whl")
    assert_clean_error(run_cli("kit", "build", "-d", str(layout.root), "--bundle", str(lean), "--task", str(task)),
                       ExitCode.ERROR, "lacks what the tasks need (tabulate>=0.9)",
                       f"flowerbed bundle wheels --task {task}")  # fmt: skip
    assert_clean_error(run_cli("kit", "build", "-d", str(layout.root), "--task", str(tmp_path / "nope.whl")),
                       ExitCode.ERROR, "nope.whl does not exist")  # fmt: skip
    built = run_cli("kit", "build", "-d", str(layout.root), "--bundle", str(bundle.folder), "--task", str(task),
                    "--site", "site-x", timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    vm = tmp_path / "vm"
    with tarfile.open(layout.root / "kits" / "site-x.tar.gz") as tar:
        tar.extractall(vm, filter="data")
    kit = vm / "site-x"
    assert (kit / "wheels" / "requirements.txt").read_text() == bundle.requirements.read_text()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)}
    # The VM's bare Python 3.11 (this machine's base interpreter, not our venv); the rest as documented.
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", install.OFFLINE], capture_output=True, text=True, timeout=900,
                          env={**env, "PYTHON": f"{sys.base_prefix}/bin/python3"}, check=False, cwd=kit)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installing with uv, from wheels/" in done.stdout, done.stdout  # the bundle carries uv's wheel
    print(f"offline install from the kit's wheels/ with uv: {time.monotonic() - started:.0f} s")
    py = kit / ".venv" / "bin" / "python"
    check = subprocess.run(
        [str(py), "-c", "import flwr, torch, flowerbed.clientapp.app, flowerbed.serverapp.app; print(torch.__version__)"],
        capture_output=True, text=True, timeout=300, env=env, check=False, cwd=kit,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "2.13.0+cpu"
    version = subprocess.run([str(kit / ".venv" / "bin" / "flowerbed"), "--version"], capture_output=True,
                             text=True, timeout=60, env=env, check=False, cwd=kit)  # fmt: skip
    assert version.stdout.strip() == "flowerbed 0.1.0"
    # The task in the kit: its dependency is installed (no warning), the steward approves it, and it
    # imports from the approved wheel in the kit's own environment.
    assert '- "tabulate>=0.9"' in (kit / "environment.yml").read_text()
    assert f"flowerbed supernode approve tasks/{task.name} --kit ." in (kit / "README.md").read_text()
    approved = subprocess.run([str(kit / ".venv" / "bin" / "flowerbed"), "supernode", "approve", f"tasks/{task.name}",
                               "--yes"], capture_output=True, text=True, timeout=120, env={**env, "COLUMNS": "200"},
                              check=False, cwd=kit)  # fmt: skip
    assert approved.returncode == 0 and "tabulate>=0.9" in approved.stdout, approved.stdout + approved.stderr
    assert "not installed here" not in approved.stderr
    load = (
        "from pathlib import Path; from flowerbed.supernode.approval import load_site; from flowerbed.task import "
        "load_task; a = load_site(Path('.')).approved[0]; print(load_task(a.name, a.sha256, Path(a.file)).name)"
    )
    loaded = subprocess.run([str(py), "-c", load], capture_output=True, text=True, timeout=120, env=env,
                            check=False, cwd=kit)  # fmt: skip
    assert loaded.stdout.strip() == "tab-task", loaded.stderr
    assert install.OFFLINE in (bundle.folder / "INSTALL.txt").read_text()


def test_bundle_for_too_old_a_platform_says_why(tmp_path: Path) -> None:
    with pytest.raises(FlowerbedError) as info:
        bundle_wheels(tmp_path / "wheels", platform="manylinux2014_x86_64", torch_index=None)
    message = info.value.message
    assert "has no wheel for Python 3.11 on manylinux2014_x86_64" in message
    assert "torch" in message.split("has no wheel")[0]
    assert "use --platform linux" in message


@pytest.fixture
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def verify(tool: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)


def test_systemd_units_verify(analyze: str, tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "flowerbed")
    units = {
        "flowerbed-supernode.service": site_unit("inst-a", "fed", str(tmp_path), exe),
        "flowerbed-coordinator.service": coordinator_unit("fed", str(tmp_path), exe),
    }
    for name, text in units.items():
        (tmp_path / name).write_text(text)
        result = verify(analyze, tmp_path / name)
        assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
        assert "Restart=on-failure" in text
    assert "RestartPreventExitStatus=3 4" in units["flowerbed-supernode.service"]
    # the check is real: a broken directive is reported
    broken = tmp_path / "flowerbed-supernode.service"
    broken.write_text(units["flowerbed-supernode.service"].replace("Restart=on-failure", "Restart=sometimes"))
    assert "Failed to parse" in verify(analyze, broken).stderr
