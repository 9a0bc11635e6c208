"""Build one startup kit per site: folder + one archive (.tar.gz, or .zip for a Windows site), assembled in a
temp dir, moved in whole."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import BinaryIO

import tomli_w

from flowerbed.artifacts import WheelInfo, read_task_wheel, task_requirements
from flowerbed.certs import service
from flowerbed.certs.files import PRIVATE_MODE
from flowerbed.config import SITE_FILE, FederationConfig, Site, SiteKitConfig
from flowerbed.deploy import install
from flowerbed.deploy.bundle import TASKS_DIR, Report, bundle_system, project_root, run_pip, source_build_lock
from flowerbed.deploy.condaenv import Role, render
from flowerbed.deploy.render import fill, template
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout

EXECUTABLE = 0o700  # the kit is its owner's alone: scripts too
DEFAULT_KIT_DIR = "/opt/flowerbed/kit"
DEFAULT_FLOWERBED = "/opt/conda/envs/flowerbed-supernode-cpu/bin/flowerbed"


def site_unit(site: str, federation: str, kit_dir: str, flowerbed: str) -> str:
    """The systemd unit that runs a site's SuperNode from its kit."""
    values = {"SITE": site, "FEDERATION": federation, "KIT_DIR": kit_dir, "FLOWERBED": flowerbed}
    return fill("flowerbed-supernode.service", values)


def coordinator_unit(federation: str, fed_dir: str, flowerbed: str) -> str:
    """The systemd unit that runs `flowerbed superlink start` for a federation."""
    values = {"FEDERATION": federation, "FED_DIR": fed_dir, "FLOWERBED": flowerbed}
    return fill("flowerbed-coordinator.service", values)


@dataclass(frozen=True)
class BuiltKit:
    """A site kit that was built: its site, folder and archive."""

    site: str
    folder: Path
    archive: Path


def _tasks_text(tasks: Sequence[WheelInfo]) -> str:
    if not tasks:
        return ""
    lines = ["", "This kit carries own tasks in `tasks/` (what they need is in the environment files, and in",
             "`wheels/` when the kit has it). To let one run on your data, approve it:", ""]  # fmt: skip
    for info in tasks:
        (name,) = info.tasks
        lines.append(f"- `{name}` {info.version}, sha256 `{info.sha256}`:")
        lines.append(f"  `flowerbed supernode approve {TASKS_DIR}/{info.path.name} --kit .`")
    return "\n".join(lines) + "\n"


def _write_site(
    stage: Path,
    layout: FederationLayout,
    config: FederationConfig,
    site: str,
    wheel_name: str,
    *,
    tasks: Sequence[WheelInfo] = (),
) -> None:
    for path in (layout.node_key(site), layout.node_pub(site)):
        if not path.is_file():
            raise FlowerbedError(f"{path} is missing: run `flowerbed certs node {site} --force` to make a new pair")
    stage.mkdir(parents=True)
    shutil.copyfile(layout.ca_cert, stage / "ca.crt")
    shutil.copyfile(layout.server_cert, stage / "server.crt")
    key = stage / f"{site}.key"
    shutil.copyfile(layout.node_key(site), key)
    key.chmod(PRIVATE_MODE)
    shutil.copyfile(layout.node_pub(site), stage / f"{site}.key.pub")
    kit_config = SiteKitConfig(
        federation=config.name,
        site=site,
        superlink_address=config.superlink.address,
        superlink_port=config.superlink.port,
        supernode_port=config.supernode_port,
    )
    (stage / SITE_FILE).write_text(
        "# Site settings for `flowerbed supernode start --kit .`; set data_path before the first start.\n"
        + tomli_w.dumps(kit_config.model_dump(exclude_none=True))
        + PRIVACY_EXAMPLE,
        encoding="utf-8",
    )
    names, extra = [t.path.name for t in tasks], task_requirements(list(tasks))
    (stage / "environment.yml").write_text(render(Role.supernode_cpu, names, extra), encoding="utf-8")
    (stage / "environment-cuda.yml").write_text(render(Role.supernode_cuda, names, extra), encoding="utf-8")
    if tasks:
        (stage / TASKS_DIR).mkdir()
        for info in tasks:
            shutil.copyfile(info.path, stage / TASKS_DIR / info.path.name)
    deploy = files("flowerbed.deploy")
    (stage / "firewall_checklist.py").write_text(deploy.joinpath("firewall_checklist.py").read_text("utf-8"))
    (stage / "allowlist.json").write_text(deploy.joinpath("allowlist.json").read_text("utf-8"))
    for script in ("start-supernode.sh", "start-supernode.ps1", "install-offline.sh", "install-offline.ps1"):
        (stage / script).write_text(template(script), encoding="utf-8")
    for exe in ("start-supernode.sh", "install-offline.sh", "firewall_checklist.py"):
        (stage / exe).chmod(EXECUTABLE)
    (stage / "flowerbed-supernode.service").write_text(
        site_unit(site, config.name, f"{DEFAULT_KIT_DIR}-{site}", DEFAULT_FLOWERBED), encoding="utf-8"
    )
    values = {
        "SITE": site,
        "FEDERATION": config.name,
        "ADDRESS": config.superlink.address,
        "PORT": str(config.superlink.port),
        "INSTALL_ONLINE": install.ONLINE,
        "INSTALL_OFFLINE": install.OFFLINE,
        "INSTALL_OFFLINE_WINDOWS": install.OFFLINE_WINDOWS,
        "WHEEL": wheel_name,
        "TASKS": _tasks_text(tasks),
    }
    (stage / "README.md").write_text(fill("kit-README.md", values), encoding="utf-8")


def _private(path: Path) -> BinaryIO:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE), "wb")


ARCHIVE_FORMATS = ("tar.gz", "zip")


def _archive(folder: Path, out_dir: Path, fmt: str) -> Path:
    """``folder`` as ``out_dir/NAME.tar.gz`` or ``.zip``; it holds the site's private key: created 0600."""
    archive = out_dir / f"{folder.name}.{fmt}"
    if fmt == "tar.gz":
        with _private(archive) as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:  # keeps the key's 0600
            tar.add(folder, arcname=folder.name)
        return archive
    with _private(archive) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            info = zipfile.ZipInfo.from_file(path, arcname=f"{folder.name}/{path.relative_to(folder)}")
            if path.is_file():
                with path.open("rb") as source:
                    zf.writestr(info, source.read(), zipfile.ZIP_DEFLATED)
    return archive


def _kit_wheel(stage_root: Path, wheel: Path | None, report: Report) -> Path:
    """The flowerbed wheel every kit carries: ``wheel`` as given, or built from this source tree."""
    if wheel is not None:
        if not (wheel.is_file() and wheel.name.startswith("flowerbed-") and wheel.suffix == ".whl"):
            raise FlowerbedError(f"--wheel {wheel} is not a flowerbed-*.whl file")
        return wheel
    root = project_root()
    if root is None:
        raise FlowerbedError(
            "this flowerbed is not installed from its source tree, so it cannot build its own wheel: "
            "pass --wheel flowerbed-VERSION-py3-none-any.whl"
        )
    out = stage_root / "_wheel"
    report(f"building the flowerbed wheel from {root}")
    # No build isolation: the environment's own setuptools builds it, so a coordinator without
    # internet access can build kits too (scripts/setup.sh installs setuptools and wheel).
    with source_build_lock(root):
        run_pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(root)], report,
                "building the flowerbed wheel")  # fmt: skip
    return next(out.glob("flowerbed-*.whl"))


def _check_bundle(bundle: Path, tasks: Sequence[WheelInfo] = ()) -> list[Path]:
    if not (bundle / "requirements.txt").is_file():
        raise FlowerbedError(
            f"{bundle} is not an offline bundle (no requirements.txt): make it with `flowerbed bundle wheels`"
        )
    held = (bundle / "requirements.txt").read_text(encoding="utf-8").split()
    lacking = [r for r in task_requirements(list(tasks)) if r.replace(" ", "") not in held]
    if lacking:
        options = " ".join(f"--task {t.path}" for t in tasks)
        raise FlowerbedError(
            f"{bundle} lacks what the tasks need ({', '.join(lacking)}): "
            f"make it with `flowerbed bundle wheels {options}`"
        )
    wheels = [w for w in sorted(bundle.glob("*.whl")) if not w.name.startswith("flowerbed-")]
    if not wheels:
        raise FlowerbedError(f"{bundle} holds no wheels: make it with `flowerbed bundle wheels`")
    return wheels


def _bundle_for(site: Site, by_system: dict[str, tuple[Path, list[Path]]]) -> tuple[Path, list[Path]]:
    """The bundle made for ``site``'s system, or what to make."""
    if site.platform in by_system:
        return by_system[site.platform]
    given = ", ".join(f"{b} ({system})" for system, (b, _) in by_system.items())
    option = "windows" if site.platform == "windows" else "linux" if site.platform == "linux" else "TAG"
    raise FlowerbedError(
        f"site {site.name} runs {site.platform} (platform in federation.toml) but no bundle is for {site.platform} "
        f"(given: {given}): make one with `flowerbed bundle wheels --platform {option} --out DIR` and pass "
        "--bundle DIR too"
    )


PRIVACY_EXAMPLE = """
# Differential privacy that this site enforces on every run, whatever the coordinator asks
# (docs/privacy.md). Uncomment to set the site's budget: each run's DP-SGD spends at most this.
# [privacy]
# epsilon = 3.0          # the most epsilon this site spends (per run; scope = "site": in all runs)
# delta = 1e-5           # below 1 / the number of your examples
# max_grad_norm = 1.0    # per-example clipping norm
# scope = "run"
"""


def build_kits(
    layout: FederationLayout,
    config: FederationConfig,
    sites: list[str] | None = None,
    *,
    wheel: Path | None = None,
    bundles: Sequence[Path] = (),
    tasks: Sequence[Path] = (),
    archive_format: str | None = None,
    report: Report = lambda _m: None,
) -> list[BuiltKit]:
    """Build kits into FED/kits/; keys are created only when missing, the CA is never touched.

    Each kit carries the flowerbed wheel; with ``bundles`` (``flowerbed bundle wheels`` folders, one
    per system) it also carries every other wheel in ``wheels/``, for a VM without package access:
    the bundle made for its site's ``platform``, and no other. ``tasks``: own
    tasks' wheels, carried in ``tasks/`` for the sites to approve, their dependencies in the
    environment files (and required in the bundle). Each kit is one archive: ``archive_format``
    (``tar.gz`` or ``zip``) for all, else by each site's ``platform`` (a ``.zip`` for Windows).
    """
    if archive_format is not None and archive_format not in ARCHIVE_FORMATS:
        raise FlowerbedError(f"--format {archive_format!r}: use one of {', '.join(ARCHIVE_FORMATS)}")
    if not layout.ca_cert.is_file():
        raise FlowerbedError(f"{layout.ca_cert} is missing: run `flowerbed certs init` first")
    if not layout.server_cert.is_file():
        raise FlowerbedError(f"{layout.server_cert} is missing: run `flowerbed certs server` first")
    task_infos = [read_task_wheel(path) for path in tasks]
    by_system = {bundle_system(b): (b, _check_bundle(b, task_infos)) for b in bundles}
    names = sites or [s.name for s in config.sites]
    formats = {name: archive_format or config.site(name).archive_format for name in names}
    chosen = {name: _bundle_for(config.site(name), by_system) for name in names} if bundles else {}
    for name in names:
        if not layout.node_key(name).is_file():
            service.make_node_key(layout, config, name)
    out_dir = layout.root / "kits"
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    built: list[BuiltKit] = []
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
        stage_root = Path(tmp)
        kit_wheel = _kit_wheel(stage_root, wheel, report)
        for name in names:
            folder = stage_root / name
            _write_site(folder, layout, config, name, kit_wheel.name, tasks=task_infos)
            shutil.copyfile(kit_wheel, folder / kit_wheel.name)
            if name in chosen:
                bundle, bundle_wheels = chosen[name]
                (folder / "wheels").mkdir()
                shutil.copyfile(bundle / "requirements.txt", folder / "wheels" / "requirements.txt")
                for item in bundle_wheels:
                    shutil.copyfile(item, folder / "wheels" / item.name)
            _archive(folder, stage_root, formats[name])
        # Everything is complete: move it into place (a failed build above leaves nothing behind).
        for name in names:
            final = out_dir / name
            if final.exists():
                shutil.rmtree(final)
            (stage_root / name).replace(final)
            archive = out_dir / f"{name}.{formats[name]}"
            for fmt in ARCHIVE_FORMATS:  # an archive of the other format from an earlier build would mislead
                (out_dir / f"{name}.{fmt}").unlink(missing_ok=True)
            (stage_root / archive.name).replace(archive)
            built.append(BuiltKit(name, final, archive))
    return built
