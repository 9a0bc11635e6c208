"""A site's startup kit as the SuperNode reads it: the checks on the kit's files and its settings."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from flowerbed.certs.files import check_private_mode
from flowerbed.certs.service import cert_sans, read_cert
from flowerbed.clientapp.device import check_device
from flowerbed.config import DATA_PLACEHOLDER, SITE_FILE, SiteKitConfig, load_toml_model, resolve
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.heldout import TEST_PATH_KEY
from flowerbed.supernode.preflight import parse_address
from flowerbed.supernode.supervisor import WARM, SupernodeSpec

INCOMPLETE = "the kit is incomplete: unpack the whole SITE.tar.gz (or .zip) from your coordinator again"


@dataclass(frozen=True)
class SiteKit:
    """A checked, unpacked kit folder (``root`` is absolute, so children may run anywhere)."""

    root: Path
    config: SiteKitConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", self.root.resolve())

    @property
    def ca(self) -> Path:
        """The kit's CA certificate."""
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The coordinator's server certificate, as the kit carries it."""
        return self.root / "server.crt"

    @property
    def key(self) -> Path:
        """The site's node private key in the kit."""
        return self.root / f"{self.config.site}.key"

    @property
    def data(self) -> Path:
        """The data path from site.toml; relative paths are relative to the kit folder."""
        if self.config.data_path == DATA_PLACEHOLDER:
            raise FlowerbedError(
                f"set data_path in {self.root / SITE_FILE} to your data (or pass --data)",
                exit_code=ExitCode.PREFLIGHT_FAILED,
            )
        return self._under_root(self.config.data_path)

    @property
    def workdir(self) -> Path:
        """The SuperNode's working folder (site.toml's ``workdir``, under the kit)."""
        return self._under_root(self.config.workdir)

    def _under_root(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path


def _fail(message: str) -> FlowerbedError:
    return FlowerbedError(f"kit: {message}", exit_code=ExitCode.PREFLIGHT_FAILED)


def load_kit(root: Path) -> SiteKit:
    """Read and check a kit: files present, key 0600, certificates valid, address in the SANs."""
    if not root.is_dir():
        raise _fail(f"{root} is not a folder: unpack the site kit and pass its folder to --kit")
    config = load_toml_model(root / SITE_FILE, SiteKitConfig, missing=INCOMPLETE)
    kit = SiteKit(root=root, config=config)
    for path in (kit.ca, kit.server_cert, kit.key, kit.key.with_name(kit.key.name + ".pub")):
        if not path.is_file():
            raise _fail(f"{path.name} is missing from {kit.root}: {INCOMPLETE}")
    problem = check_private_mode(kit.key)
    if problem:
        raise _fail(problem)
    now = dt.datetime.now(dt.UTC)
    named = ((kit.ca, "the federation CA"), (kit.server_cert, "the gateway certificate"))
    certs = {path: read_cert_checked(path, what) for path, what in named}
    for path, what in named:
        cert = certs[path]
        if cert.not_valid_after_utc <= now:
            raise _fail(
                f"{what} ({path.name}) expired on {cert.not_valid_after_utc.date()}: ask the coordinator for a new kit"
            )
    sans = cert_sans(certs[kit.server_cert])
    if config.superlink_address not in sans:
        raise _fail(
            f"superlink_address {config.superlink_address!r} in site.toml is not a name of the gateway "
            f"certificate ({', '.join(sans)}): use one of those, or ask the coordinator to add it"
        )
    return kit


def read_cert_checked(path: Path, what: str) -> x509.Certificate:
    """A kit certificate, or a preflight error (exit 3) saying the kit is damaged."""
    try:
        return read_cert(path)
    except FlowerbedError:
        raise _fail(f"{path.name} ({what}) is damaged, not a PEM certificate: {INCOMPLETE}") from None


def site_spec(
    kit_dir: Path | None,
    *,
    superlink: str | None = None,
    ca: Path | None = None,
    key: Path | None = None,
    data: Path | None = None,
    site: str | None = None,
    workdir: Path | None = None,
    port: int | None = None,
    executor: str | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> SupernodeSpec:
    """What one SuperNode runs with: the kit's site.toml merged with options (options win).

    Paths given as options are relative to the current folder, paths in site.toml relative to the
    kit; either way the spec holds absolute paths, because the SuperNode runs in its work folder.
    """
    address = parse_address(superlink) if superlink else (None, None)
    if kit_dir is not None:
        kit = load_kit(kit_dir)
        config = resolve(
            kit.config,
            {
                "site": site,
                "superlink_address": address[0],
                "superlink_port": address[1],
                "data_path": str(data.resolve()) if data else None,
                "workdir": str(workdir.resolve()) if workdir else None,
                "supernode_port": port,
                "executor": executor,
                "torch_threads": threads,
                "device": device,
            },
        )
        kit = SiteKit(root=kit.root, config=config)
        return SupernodeSpec(
            site=config.site,
            superlink=config.superlink,
            ca=ca or kit.ca,
            key=key or kit.key,
            data=kit.data,
            workdir=kit.workdir,
            port=config.supernode_port,
            site_file=kit.root / SITE_FILE,
            executor=config.executor,
            threads=config.torch_threads,
            device=config.device,
            pull_s=config.pull_s,
            privacy=config.privacy,
            secure_only=config.require_secure_aggregation,
            extra_node_config={TEST_PATH_KEY: str(kit._under_root(config.test_path))} if config.test_path else {},
        )
    missing = [n for n, v in (("--superlink", superlink), ("--ca", ca), ("--key", key), ("--data", data)) if v is None]
    if missing or superlink is None or ca is None or key is None or data is None:
        raise FlowerbedError(f"pass --kit KIT_FOLDER, or all of {', '.join(missing)}")
    return SupernodeSpec(
        site=site or key.name.removesuffix(".key"),
        superlink=superlink,
        ca=ca,
        key=key,
        data=data,
        workdir=workdir or Path("supernode-work"),
        port=port or 9094,
        executor=executor or WARM,
        threads=threads or 0,
        device=_device(device or "auto"),
    )


def _device(value: str) -> str:
    """``--device`` checked, or the choices in one line."""
    try:
        return check_device(value)
    except ValueError as exc:
        raise FlowerbedError(f"--device: {exc}") from None
