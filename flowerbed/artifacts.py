"""What a task wheel or a Flower App (FAB) is, read from the file without importing any of its code.

Both the coordinator (`flowerbed run --task WHEEL`, `--app`) and a site's data steward
(`flowerbed supernode approve`) read the same facts: name, version, sha256, the task names or app
components, and the dependencies. Nothing here executes the package: zip members are read as text.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from flowerbed.errors import FlowerbedError

TASK_GROUP = "flowerbed.tasks"  # the entry-point group a task wheel names its task in
KIT_CLIENTAPP = "flowerbed.clientapp.app:app"
KIT_SERVERAPP = "flowerbed.serverapp.app:app"
FAB_MANIFEST = "pyproject.toml"
FAB_CONTENT = ".info/CONTENT"


def sha256_bytes(data: bytes) -> str:
    """The sha256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of the file at ``path``, hex (read in chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WheelInfo:
    """A task wheel: its distribution, the task(s) it names and what it needs."""

    path: Path
    sha256: str
    dist: str
    version: str
    tasks: dict[str, str]  # task name -> "module:object"
    requires: list[str] = field(default_factory=list)
    pure: bool = True
    modules: tuple[str, ...] = ()  # the top-level names it puts on the import path
    record: dict[str, str] = field(default_factory=dict)  # file -> sha256 (hex), from its RECORD
    autorun: tuple[tuple[str, str], ...] = ()  # (what, file or name): code that runs without the task being called

    def runtime_requires(self) -> list[str]:
        """The dependencies pip installs with it (no extras)."""
        return [r for r in self.requires if "extra ==" not in r]

    def task_target(self, name: str) -> str:
        """The ``module:attribute`` of task ``name`` in this wheel, or a one-line error."""
        if name not in self.tasks:
            raise FlowerbedError(f"{self.path.name} has no task {name!r} (it has {', '.join(self.tasks) or 'none'})")
        return self.tasks[name]


NATIVE = (".so", ".pyd", ".dylib", ".dll")


def _record(text: str) -> dict[str, str]:
    """RECORD's ``path,sha256=<urlsafe base64>,size`` rows as path -> hex sha256 (rows without a hash left out)."""
    out = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1].startswith("sha256="):
            raw = row[1].removeprefix("sha256=")
            out[row[0]] = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return out


def _layout(
    names: list[str], info_dir: str, points: configparser.ConfigParser
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The top-level import names of a wheel's files, and what in it runs on its own when installed or imported."""
    modules: set[str] = set()
    autorun: list[tuple[str, str]] = []
    for name in names:
        if name.endswith("/") or name.startswith(info_dir + "/"):
            continue
        parts = name.split("/")
        if parts[0].endswith(".data"):
            if len(parts) > 2 and parts[1] == "scripts":
                autorun.append(("script", name))
            parts = parts[2:] if len(parts) > 2 and parts[1] in ("purelib", "platlib") else []
        if not parts:
            continue
        if len(parts) == 1 and parts[0].endswith(".pth"):
            autorun.append((".pth file (runs at every Python start)", name))
            continue
        if name.endswith(NATIVE) or ".cpython-" in name or ".abi3." in name:
            autorun.append(("native extension", name))
        top = parts[0] if len(parts) > 1 else parts[0].split(".")[0]
        if top and (len(parts) > 1 or parts[0].endswith((".py", *NATIVE)) or ".cpython-" in parts[0]):
            modules.add(top)
    for group in points.sections():
        if group == TASK_GROUP:
            continue
        what = "console script" if group in ("console_scripts", "gui_scripts") else f"entry point ({group})"
        autorun.extend((what, f"{key} = {value.strip()}") for key, value in points.items(group))
    return tuple(sorted(modules)), tuple(autorun)


def read_wheel(path: Path) -> WheelInfo:
    """The facts of a task wheel; a file that is not one is named in one line."""
    if not path.is_file():
        raise FlowerbedError(f"{path} does not exist: build the task's wheel with `flowerbed task build PATH`")
    if path.suffix != ".whl":
        raise FlowerbedError(f"{path} is not a wheel (.whl): build one with `flowerbed task build PATH`")
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            info_dir = next((n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")), None)
            if info_dir is None:
                raise FlowerbedError(f"{path.name} is not a wheel: it has no .dist-info/METADATA")
            metadata = Parser().parsestr(archive.read(f"{info_dir}/METADATA").decode("utf-8"))
            wheel_meta = Parser().parsestr(archive.read(f"{info_dir}/WHEEL").decode("utf-8"))
            points = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            points.optionxform = str  # type: ignore[assignment,method-assign]
            if f"{info_dir}/entry_points.txt" in names:
                points.read_string(archive.read(f"{info_dir}/entry_points.txt").decode("utf-8"))
            record = _record(archive.read(f"{info_dir}/RECORD").decode("utf-8"))
    except zipfile.BadZipFile:
        raise FlowerbedError(f"{path.name} is damaged: not a zip archive; copy or build it again") from None
    except KeyError as exc:
        raise FlowerbedError(f"{path.name} is not a complete wheel: {exc.args[0]} is missing") from None
    tasks = dict(points.items(TASK_GROUP)) if points.has_section(TASK_GROUP) else {}
    tags = wheel_meta.get_all("Tag") or []
    modules, autorun = _layout(names, info_dir, points)
    return WheelInfo(
        path=path,
        sha256=sha256_bytes(data),
        dist=str(metadata["Name"]),
        version=str(metadata["Version"]),
        tasks={name: target.strip() for name, target in tasks.items()},
        requires=[str(r) for r in metadata.get_all("Requires-Dist") or []],
        pure=all(tag.endswith("-none-any") for tag in tags),
        modules=modules,
        record=record,
        autorun=autorun,
    )


def read_task_wheel(path: Path) -> WheelInfo:
    """A wheel that names exactly one task and is pure Python (it is imported from the wheel file)."""
    info = read_wheel(path)
    if len(info.tasks) != 1:
        raise FlowerbedError(
            f'{path.name} names {len(info.tasks)} tasks: a task wheel names one under [project.entry-points."'
            f'{TASK_GROUP}"] (`flowerbed task new` writes it)'
        )
    if not info.pure:
        raise FlowerbedError(
            f"{path.name} is not pure Python (py3-none-any): put compiled code in a dependency, not in the task"
        )
    return info


@dataclass(frozen=True)
class FabInfo:
    """A Flower App bundle (FAB), as Flower hashes and unpacks it."""

    sha256: str
    name: str
    version: str
    publisher: str
    components: dict[str, str]
    requires: list[str]
    files: list[str]

    @property
    def is_kit_app(self) -> bool:
        """flowerbed's own manifest-only app: no code inside, the kit's installed ServerApp/ClientApp."""
        return set(self.files) <= {FAB_MANIFEST, FAB_CONTENT} and self.components.get("clientapp") == KIT_CLIENTAPP


def read_fab_bytes(data: bytes, what: str = "the app") -> FabInfo:
    """The facts of a FAB from its bytes (the sha256 is Flower's own FAB hash)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            files = sorted(archive.namelist())
            pyproject = tomllib.loads(archive.read(FAB_MANIFEST).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FlowerbedError(f"{what} is not a Flower App bundle (.fab): {exc}") from None
    project = pyproject.get("project", {})
    app = pyproject.get("tool", {}).get("flwr", {}).get("app", {})
    return FabInfo(
        sha256=sha256_bytes(data),
        name=str(project.get("name", "?")),
        version=str(project.get("version", "?")),
        publisher=str(app.get("publisher", "?")),
        components={str(k): str(v) for k, v in app.get("components", {}).items()},
        requires=[str(r) for r in project.get("dependencies", [])],
        files=files,
    )


def build_fab(app_dir: Path) -> bytes:
    """The FAB Flower builds from an app folder (deterministic: the same folder, the same hash)."""
    from flowerbed.flower import compat

    if not (app_dir / FAB_MANIFEST).is_file():
        raise FlowerbedError(f"{app_dir} is not a Flower App (no pyproject.toml): make one with `flwr new`")
    try:
        return bytes(compat.build_fab(app_dir))
    except ValueError as exc:
        raise FlowerbedError(f"{app_dir} is not a valid Flower App: {exc}") from None


def read_app(path: Path) -> FabInfo:
    """A Flower App given as a .fab file or as its folder."""
    if path.is_dir():
        return read_fab_bytes(build_fab(path), str(path))
    if not path.is_file():
        raise FlowerbedError(f"{path} does not exist: pass a Flower App folder or a .fab file (`flwr build`)")
    return read_fab_bytes(path.read_bytes(), path.name)


def task_requirements(wheels: list[WheelInfo]) -> list[str]:
    """The dependencies of task wheels, each once, in order (what a site installs next to flowerbed)."""
    out: list[str] = []
    for wheel in wheels:
        out.extend(r for r in wheel.runtime_requires() if r not in out)
    return out
