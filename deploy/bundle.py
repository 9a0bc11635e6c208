"""Offline install bundles: every wheel a SuperNode environment needs, for `pip install --no-index`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowerbed.deploy.condaenv import CPU_INDEX, Role, pip_part
from flowerbed.errors import FlowerbedError

Report = Callable[[str], None]
INSTALL_NOTE = """Offline install of flowerbed ({role}) for Python {python} on {platform}.
On the VM, inside a fresh environment (conda create -n flowerbed python={python}, or python -m venv):

    pip install --no-index --find-links . -r requirements.txt {kit_wheel}

No package index is contacted.
"""


@dataclass(frozen=True)
class Bundle:
    folder: Path
    wheels: list[Path]
    requirements: Path


def project_root() -> Path | None:
    """The source tree this flowerbed runs from (it builds the kit's own wheel), if any."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else None


def _pip(args: list[str], report: Report, what: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--progress-bar", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None  # noqa: S101 - PIPE was requested
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith(("Collecting", "Saved", "Downloading", "File was already")):
            report(line)
        if line and not line.startswith("WARNING: Location"):
            tail = [*tail[-4:], line]
    if proc.wait() != 0:
        raise FlowerbedError(f"{what} failed: {' | '.join(tail)}")


def bundle_wheels(
    out: Path,
    *,
    role: Role = "supernode-cpu",
    platform: str | None = None,
    python_version: str = "3.11",
    torch_index: str | None = CPU_INDEX,
    source: Path | None = None,
    report: Report = lambda _m: None,
) -> Bundle:
    """Download the wheels of ``role``'s pip part (plus the kit's own wheel) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    requirements = [line for line in pip_part(role) if not line.startswith("--")]
    req_file = out / "requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    args = ["download", "--dest", str(out), "-r", str(req_file)]
    if platform:
        args += ["--only-binary=:all:", "--platform", platform, "--python-version", python_version]
    if torch_index:
        args += ["--extra-index-url", torch_index]
    _pip(args, report, "downloading the wheels")
    root = source or project_root()
    kit_wheel = "flowerbed"
    if root is not None:
        _pip(["wheel", "--no-deps", "--wheel-dir", str(out), str(root)], report, "building the flowerbed wheel")
        kit_wheel = "flowerbed-*.whl"
    (out / "INSTALL.txt").write_text(
        INSTALL_NOTE.format(
            role=role, python=python_version, platform=platform or "this platform", kit_wheel=kit_wheel
        ),
        encoding="utf-8",
    )
    wheels = sorted(out.glob("*.whl"))
    if not wheels:
        raise FlowerbedError(f"no wheels ended up in {out}")
    return Bundle(folder=out, wheels=wheels, requirements=req_file)
