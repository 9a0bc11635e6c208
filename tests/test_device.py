"""GPU sites: where tasks train (site.toml ``device``), and a warm executor whose parent never touches CUDA.

This machine has no GPU and a CPU build of torch: the invariant is checked where it can break here
(nothing on the executor's warm-up path calls into CUDA's initialization), the preflight's refusal
of ``device = "cuda"`` runs as a site would meet it, and the device a task picks is read in a real
process with the environment the supervisor gives it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed.config import DATA_PLACEHOLDER
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from flowerbed.protocol import DEVICE_ENV, SITE_FILE_ENV
from flowerbed.supernode.sitekit import site_spec
from flowerbed.warmexec import DP_SITE_ENV
from tests.conftest import SITES, assert_clean_error, make_config, make_federation, run_cli

REPO = Path(__file__).resolve().parent.parent

# The warm executor's preload as it runs, with torch's CUDA initialization wrapped to count its calls.
WATCHED_PRELOAD = """
import json, torch, torch.cuda
calls = []
real = torch.cuda._lazy_init
def watched(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
torch.cuda._lazy_init = watched
from flowerbed.supernode import warm
warm.preload()
print(json.dumps({"initialized": torch.cuda.is_initialized(), "init_calls": len(calls)}))
"""


def _python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout, check=False)  # fmt: skip


def _task_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment the supervisor gives the executor (a site without a kit), plus ``extra``."""
    spec = site_spec(None, superlink="127.0.0.1:9092", ca=tmp_path / "ca.crt", key=tmp_path / "inst-a.key",
                     data=tmp_path / "data.csv", workdir=tmp_path / "work")  # fmt: skip
    env = spec.env() | {SITE_FILE_ENV: ""} | extra
    return env


def test_the_warm_executors_parent_never_initializes_cuda(tmp_path: Path) -> None:
    """After the warm-up (torch, opacus as at a site with its own DP budget, flwr's runtime, the kit's apps,
    a step of each optimizer), CUDA is untouched: no call to torch's CUDA initialization,
    ``torch.cuda.is_initialized()`` false. The supervisor's environment makes ``torch.cuda.is_available()``
    ask NVML, not CUDA."""
    env = _task_env(tmp_path, **{DP_SITE_ENV: "1"})
    assert env["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert env[DEVICE_ENV] == "auto"
    done = _python(WATCHED_PRELOAD, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warm ClientApp executor ready" in done.stderr and "torch, opacus, flwr" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == '{"initialized": false, "init_calls": 0}', done.stdout


def test_a_parent_with_cuda_initialized_refuses_to_fork_tasks(tmp_path: Path) -> None:
    """An approved task that makes a CUDA context at import would break every forked task: the executor
    stops with one line that says what to do. (No GPU here: torch's own flag is set as CUDA would set it.)"""
    code = (
        "import torch\n"
        "torch.cuda.is_initialized = lambda: True  # what a task wheel touching the GPU at import leaves behind\n"
        "from flowerbed.supernode.warm import preload\n"
        "from flowerbed.warmexec import serve\n"
        "serve({}, preload)\n"
    )
    done = _python(code, _task_env(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "CUDA was initialized while the tasks were imported" in done.stderr
    assert 'set executor = "subprocess" in site.toml' in done.stderr


@pytest.mark.parametrize(("device", "expected"), [("cpu", "cpu"), ("cuda:1", "cuda:1"), ("auto", "cpu")])
def test_a_task_trains_on_its_sites_device(tmp_path: Path, device: str, expected: str) -> None:
    """``device`` reaches a task through its environment; ``auto`` without a GPU is the CPU. Naming a device
    initializes nothing (``cuda:1`` is only a name until a tensor goes there)."""
    code = "import torch\nfrom flowerbed.clientapp.task import device\nprint(device(), torch.cuda.is_initialized())"
    done = _python(code, _task_env(tmp_path, **{DEVICE_ENV: device}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected, "False"]


@pytest.mark.federation  # builds the kit (its wheel) as a coordinator does
def test_device_cuda_without_a_gpu_fails_the_preflight_in_one_line(tmp_path: Path) -> None:
    """A site kit's site.toml asks for the GPU on this CPU machine: the preflight refuses, in one line;
    ``cpu`` passes and its row says what the tasks train on; an unknown device is named with the choices."""
    config = make_config("gpu", SITES[:1], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    built = run_cli("kit", "build", "-d", str(layout.root), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    kit = layout.root / "kits" / SITES[0]
    data = make_demo_data(tmp_path / "data", SITES).site_files[SITES[0]]
    site_file = kit / "site.toml"
    text = site_file.read_text().replace(DATA_PLACEHOLDER, str(data))
    assert 'device = "auto"\n' in text  # every kit says it
    site_file.write_text(text.replace('device = "auto"', 'device = "cuda"'))
    refused = run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit)
    assert_clean_error(refused, ExitCode.PREFLIGHT_FAILED, 'preflight: device: device = "cuda" in site.toml, but '
                       "this VM has no GPU torch can use", 'set device = "cpu"')  # fmt: skip
    flag = run_cli("supernode", "start", "--kit", ".", "--device", "cuda:1", "--preflight-only", cwd=kit)
    assert_clean_error(flag, ExitCode.PREFLIGHT_FAILED, 'device = "cuda:1"')  # the flag wins over site.toml
    site_file.write_text(text.replace('device = "auto"', 'device = "cpu"'))
    shown = run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit)
    rows = " ".join(shown.stdout.split())
    assert '│ device │ yes │ CPU (device = "cpu"' in rows, rows
    site_file.write_text(text.replace('device = "auto"', 'device = "gpu"'))
    bad = run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert 'device \'gpu\' is not one of "auto", "cpu", "cuda" or "cuda:N"' in bad.stdout + bad.stderr
