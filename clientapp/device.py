"""Where a site's tasks train: site.toml ``device = "auto" | "cpu" | "cuda" | "cuda:N"``.

The warm executor's parent imports torch once and forks a task per round; a CUDA context made in
that parent would not survive the fork (each task would fail with "Cannot re-initialize CUDA in
forked subprocess"). So CUDA is touched only inside the tasks: the parent asks torch nothing about
the GPU (``PYTORCH_NVML_BASED_CUDA_CHECK=1`` keeps even ``torch.cuda.is_available()`` fork-safe,
it asks NVML), and what the site's console shows of the GPU comes from :func:`probe`, a process of
its own started by the preflight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowerbed.protocol import DEVICE_ENV

if TYPE_CHECKING:
    import torch

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch.cuda.is_available() asks NVML: no CUDA init, fork-safe
CHOICES = '"auto", "cpu", "cuda" or "cuda:N"'


def check_device(value: str) -> str:
    """``value`` if it names a device this kit knows, else a ValueError that lists the choices."""
    if not DEVICE_RE.fullmatch(value):
        raise ValueError(f"device {value!r} is not one of {CHOICES}")
    return value


def task_device() -> torch.device:
    """The device a task trains on: its site's ``device`` (``FLOWERBED_DEVICE``), ``auto`` by default.

    ``auto``: the first GPU when torch sees one, else the CPU. Called in the task (a fork of the warm
    executor, or a process of its own), never in the executor's parent.
    """
    import torch

    chosen = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if chosen == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(chosen)


@dataclass(frozen=True)
class DeviceReport:
    """What :func:`probe` found: the device the tasks will use and what the preflight shows of it."""

    ok: bool
    detail: str


PROBE = """
import json, sys
import torch
out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "gpus": []}
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["gpus"].append({"name": p.name, "memory": p.total_memory})
print(json.dumps(out))
"""


def _no_gpu_here() -> bool:
    """No NVIDIA device node and no nvidia-smi: no GPU torch could use (the probe's torch import is skipped)."""
    return not Path("/dev/nvidia0").exists() and shutil.which("nvidia-smi") is None


def probe(value: str, *, python: str = sys.executable, timeout_s: float = 60.0) -> DeviceReport:
    """The site's device for its console and preflight: name and memory of the GPU, or why there is none.

    Runs torch in a process of its own (it initializes CUDA to read the GPU's properties, which the
    executor's parent must never do). ``device = "cuda"`` (or ``cuda:N``) without such a GPU fails.
    """
    wants_gpu = value.startswith("cuda")
    if not wants_gpu and _no_gpu_here():
        return DeviceReport(True, f'CPU (device = "{value}"; no NVIDIA GPU on this machine)')
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout_s, check=False)
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        found = None
    if found is None and not wants_gpu:
        return DeviceReport(True, "torch could not be asked about the GPU: tasks train on the CPU")
    if found is None:
        return DeviceReport(False, f'device = "{value}" but torch could not be asked about the GPU: check the '
                            'environment (`python -c "import torch"`), or set device = "cpu"')  # fmt: skip
    gpus = found["gpus"]
    index = int(value.partition(":")[2] or 0) if wants_gpu else 0
    if not gpus:
        build = f"torch {found['torch']}, " + ("a CPU-only build" if not found["cuda_build"] else
                                               f"built for CUDA {found['cuda_build']}, sees no GPU")  # fmt: skip
        if wants_gpu:
            return DeviceReport(False, f'device = "{value}" in site.toml, but this VM has no GPU torch can use '
                                f'({build}): set device = "cpu" (or "auto"), or install the CUDA environment '
                                "(`flowerbed env conda --role supernode-cuda`)")  # fmt: skip
        return DeviceReport(True, f"CPU ({build})")
    if index >= len(gpus):
        return DeviceReport(False, f'device = "{value}" in site.toml, but torch sees {len(gpus)} GPU(s) '
                            f"(cuda:0 to cuda:{len(gpus) - 1}): pick one of them")  # fmt: skip
    gpu = gpus[index]
    memory = gpu["memory"] / 2**30
    return DeviceReport(True, f'cuda:{index} {gpu["name"]}, {memory:.1f} GiB (device = "{value}", torch '
                        f"{found['torch']}, CUDA {found['cuda_build']})")  # fmt: skip
