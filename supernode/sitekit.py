"""A site's startup kit as the SuperNode reads it: ``site.toml`` and the checks on the kit's files."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from flowerbed.certs.files import check_private_mode
from flowerbed.certs.service import cert_sans, read_cert
from flowerbed.config import Port, _Model, check_host, check_name, load_toml_model
from flowerbed.errors import ExitCode, FlowerbedError

SITE_FILE = "site.toml"
DATA_PLACEHOLDER = "CHANGE-ME: /path/to/your/data.csv or image folder"


class SiteKitConfig(_Model):
    """The content of a kit's ``site.toml``."""

    federation: str
    site: str
    superlink_address: str
    superlink_port: Port = 9092
    data_path: str = Field(DATA_PLACEHOLDER, description="CSV file or folder of class folders")
    workdir: str = Field("supernode-work", description="Logs and Flower state, relative to the kit")
    supernode_port: Port = Field(9094, description="Loopback port of the SuperNode's local API")

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        return check_name(value, "site")

    @field_validator("superlink_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host(value)

    @property
    def superlink(self) -> str:
        return f"{self.superlink_address}:{self.superlink_port}"


@dataclass(frozen=True)
class SiteKit:
    """A checked, unpacked kit folder."""

    root: Path
    config: SiteKitConfig

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def key(self) -> Path:
        return self.root / f"{self.config.site}.key"

    def data_path(self, override: Path | None) -> Path:
        if override is not None:
            return override
        if self.config.data_path == DATA_PLACEHOLDER:
            raise FlowerbedError(
                f"set data_path in {self.root / SITE_FILE} to your data (or pass --data)",
                exit_code=ExitCode.PREFLIGHT_FAILED,
            )
        path = Path(self.config.data_path).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def workdir(self) -> Path:
        path = Path(self.config.workdir).expanduser()
        return path if path.is_absolute() else self.root / path


def _fail(message: str) -> FlowerbedError:
    return FlowerbedError(f"kit: {message}", exit_code=ExitCode.PREFLIGHT_FAILED)


def load_kit(root: Path) -> SiteKit:
    """Read and check a kit: files present, key 0600, certificates valid, address in the SANs."""
    if not root.is_dir():
        raise _fail(f"{root} is not a folder: unpack the site kit and pass its folder to --kit")
    config = load_toml_model(root / SITE_FILE, SiteKitConfig)
    kit = SiteKit(root=root, config=config)
    for path in (kit.ca, kit.server_cert, kit.key, kit.key.with_name(kit.key.name + ".pub")):
        if not path.is_file():
            raise _fail(f"{path.name} is missing from {root}: ask the coordinator for a fresh kit")
    problem = check_private_mode(kit.key)
    if problem:
        raise _fail(problem)
    now = dt.datetime.now(dt.UTC)
    server_cert = read_cert(kit.server_cert)
    for path, what, cert in (
        (kit.ca, "the federation CA", read_cert(kit.ca)),
        (kit.server_cert, "the gateway certificate", server_cert),
    ):
        if cert.not_valid_after_utc <= now:
            raise _fail(
                f"{what} ({path.name}) expired on {cert.not_valid_after_utc.date()}: ask the coordinator for a new kit"
            )
    sans = cert_sans(server_cert)
    if config.superlink_address not in sans:
        raise _fail(
            f"superlink_address {config.superlink_address!r} in site.toml is not a name of the gateway "
            f"certificate ({', '.join(sans)}): use one of those, or ask the coordinator to add it"
        )
    return kit
