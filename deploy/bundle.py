"""Offline install bundles: every wheel a SuperNode environment needs, for `pip install --no-index`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowerbed.artifacts import read_task_wheel, task_requirements
from flowerbed.deploy import install
from flowerbed.deploy.condaenv import CPU_INDEX, TORCH, Role, pip_part
from flowerbed.errors import FlowerbedError

Report = Callable[[str], None]
# pip takes one tag per --platform and needs every tag a target accepts: torch's CPU wheels are
# manylinux_2_28 while other wheels (grpcio, ...) may be older manylinux only.
MANYLINUX_X86_64 = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
    "manylinux_2_5_x86_64", "manylinux1_x86_64",
]  # fmt: skip
NO_WHEEL = re.compile(r"(?:No matching distribution found for|Cannot install) (\S+?)(?: because|$)")
TASKS_DIR = "tasks"  # own tasks' wheels in a bundle and in a kit (imported from there once approved)
PLATFORMS = {"linux": MANYLINUX_X86_64, "windows": ["win_amd64"]}
UV = "uv>=0.5"  # the fast installer a bundle carries (not a dependency: only the install script uses it)
BUNDLE_FILE = "bundle.json"  # what a bundle was made for: {"system": "linux"|"windows"|"macos", "python": ...}


def index_reachable(url: str, timeout_s: float = 5.0) -> bool:
    """Whether a package index answers within ``timeout_s`` (pip would retry an unreachable one for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=timeout_s):  # noqa: S310 - an https index URL
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def system_of(platform: str | None) -> str:
    """The system (``linux``, ``windows``, ``macos``) of a ``--platform`` value; None: this machine's."""
    text = (platform or sys.platform).lower()
    if text.startswith(("win", "cygwin")):
        return "windows"
    if text.startswith(("macos", "darwin")):
        return "macos"
    return "linux"


def bundle_system(folder: Path) -> str:
    """The system a bundle's wheels are for (its ``bundle.json``; a bundle made before it: this machine's)."""
    try:
        return str(json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))["system"])
    except (OSError, ValueError, KeyError):
        return system_of(None)


def platform_tags(platform: str) -> list[str]:
    """Every pip platform tag a target accepts: ``linux``/``windows``, or one tag and the older ones it implies."""
    if platform in PLATFORMS:
        return PLATFORMS[platform]
    if platform in MANYLINUX_X86_64:
        return MANYLINUX_X86_64[MANYLINUX_X86_64.index(platform) :]
    return [platform]


INSTALL_NOTE = """Offline install of flowerbed ({role}) for Python {python} on {platform}.
Give this folder to `flowerbed kit build --bundle THIS_FOLDER`: every site kit then carries it as
wheels/, and the site installs from the kit folder with (Linux)

    {offline}

or (Windows PowerShell)

    {offline_windows}

No package index is contacted.
"""


@dataclass(frozen=True)
class Bundle:
    """An offline wheel bundle: its folder and the wheels in it."""

    folder: Path
    wheels: list[Path]
    requirements: Path


def project_root() -> Path | None:
    """The source tree this flowerbed runs from (it builds the kit's own wheel), if any."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else None


@contextlib.contextmanager
def source_build_lock(root: Path) -> Iterator[None]:
    """One wheel build from the source tree ``root`` at a time on this machine: setuptools writes its
    ``build/`` and ``*.egg-info`` into the tree, and two builds at once (two kit builds) broke each other."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a kit is built on the coordinator, one at a time there
        yield
        return
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with (Path(tempfile.gettempdir()) / f"flowerbed-build-{digest}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_pip(args: list[str], report: Report, what: str, where: str | None = None) -> None:
    """Run pip, reporting progress; a failure is one line (``where``: the target platform, if any)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--progress-bar", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None  # noqa: S101 - PIPE was requested
    tail: list[str] = []
    missing: str | None = None
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith(("Collecting", "Saved", "Downloading", "File was already")):
            report(line)
        # pip says it one of two ways, depending on whether a constraints file is in force
        found = NO_WHEEL.search(line)
        if found and missing is None:
            missing = found.group(1)
        if line and not line.startswith("WARNING: Location"):
            tail = [*tail[-4:], line]
    if proc.wait() != 0:
        if missing:
            if where is None:
                raise FlowerbedError(f"{what} failed: pip cannot get {missing}: is a package index reachable?")
            raise FlowerbedError(f"{what} failed: {missing} has no wheel for {where}")
        raise FlowerbedError(f"{what} failed: {' | '.join(tail)}")


def bundle_wheels(
    out: Path,
    *,
    role: Role = Role.supernode_cpu,
    platform: str | None = None,
    python_version: str = "3.11",
    torch_index: str | None = CPU_INDEX,
    source: Path | None = None,
    tasks: Sequence[Path] = (),
    he: bool = False,
    report: Report = lambda _m: None,
) -> Bundle:
    """Download the wheels of ``role``'s pip part (plus the kit's own wheel) into ``out``.

    ``tasks``: own tasks' wheels; their dependencies are downloaded too, and the wheels kept in ``tasks/``.
    ``he``: TenSEAL too (``secure_aggregation = "ckks"`` runs need it at every site).
    """
    from flowerbed.ckks import REQUIREMENT

    infos = [read_task_wheel(path) for path in tasks]
    out.mkdir(parents=True, exist_ok=True)
    extra = [*task_requirements(infos), *([REQUIREMENT] if he else [])]
    requirements = [line for line in pip_part(role, extra) if not line.startswith("--")]
    req_file = out / "requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    target: list[str] = []
    where = None
    if platform:
        tags = platform_tags(platform)
        where = (
            f"Python {python_version} on {platform} (torch {TORCH} needs manylinux_2_28 on Linux: use --platform linux)"
        )
        target += ["--only-binary=:all:", "--python-version", python_version]
        for tag in tags:
            target += ["--platform", tag]
    args = ["download", "--dest", str(out), "-r", str(req_file), *target]
    if torch_index and index_reachable(torch_index):
        args += ["--extra-index-url", torch_index]
    elif torch_index:
        report(f"{torch_index} (PyTorch's CPU builds) is not reachable: torch comes from the default index (a "
               "public PyPI gives Linux the CUDA build of several GB; check the bundle's size below)")  # fmt: skip
    run_pip(args, report, "downloading the wheels", where)
    try:  # the kit's install script installs with uv when its wheel is here (several times faster than pip)
        run_pip(["download", "--dest", str(out), "--no-deps", "--only-binary=:all:", *target, UV], report,
                "downloading uv, the fast installer", where)  # fmt: skip
    except FlowerbedError as exc:
        report(f"no uv wheel for {platform or 'this platform'} ({exc.message}): sites install with pip")
    root = source or project_root()
    if root is not None:
        with source_build_lock(root):
            run_pip(["wheel", "--no-deps", "--wheel-dir", str(out), str(root)], report, "building the flowerbed wheel")
    (out / "INSTALL.txt").write_text(
        INSTALL_NOTE.format(
            role=role,
            python=python_version,
            platform=platform or "this platform",
            offline=install.OFFLINE,
            offline_windows=install.OFFLINE_WINDOWS,
        ),
        encoding="utf-8",
    )
    meta = {"system": system_of(platform), "platform": platform or "this platform", "python": python_version,
            "role": str(role)}  # fmt: skip
    (out / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for info in infos:
        (out / TASKS_DIR).mkdir(exist_ok=True)
        shutil.copyfile(info.path, out / TASKS_DIR / info.path.name)
    wheels = sorted(out.glob("*.whl"))
    if not wheels:
        raise FlowerbedError(f"no wheels ended up in {out}")
    return Bundle(folder=out, wheels=wheels, requirements=req_file)
