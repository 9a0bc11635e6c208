"""Where every file of a federation directory lives (one place, so nothing guesses paths)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flowerbed.errors import FlowerbedError

RUN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")  # a run folder's name: never a path, never hidden


@dataclass(frozen=True)
class FederationLayout:
    """Paths inside a federation directory on the coordinator host."""

    root: Path

    def __post_init__(self) -> None:
        # Absolute, because the kit's processes run in other working folders (`-d .` must work).
        object.__setattr__(self, "root", self.root.expanduser().resolve())

    @property
    def config(self) -> Path:
        """federation.toml."""
        return self.root / "federation.toml"

    @property
    def pki(self) -> Path:
        """The folder of the CA and the server certificate."""
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate."""
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key (0600)."""
        return self.pki / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The gateway's server certificate."""
        return self.pki / "server.crt"

    @property
    def server_key(self) -> Path:
        """The gateway's server key (0600)."""
        return self.pki / "server.key"

    @property
    def nodes(self) -> Path:
        """The folder of the sites' node keys."""
        return self.root / "nodes"

    def node_key(self, site: str) -> Path:
        """``site``'s node private key."""
        return self.nodes / f"{site}.key"

    def node_pub(self, site: str) -> Path:
        """``site``'s node public key."""
        return self.nodes / f"{site}.key.pub"

    @property
    def state(self) -> Path:
        """The SuperLink's state folder."""
        return self.root / "superlink"

    @property
    def replies(self) -> Path:
        """Each run's reply tally, kept by the SuperLink (``RUN_ID.json``: trained, refused, failed)."""
        return self.state / "replies"

    @property
    def database(self) -> Path:
        """The SuperLink's SQLite database."""
        return self.state / "state.db"

    @property
    def superexec_secret(self) -> Path:
        """The shared secret of the SuperLink and its executor."""
        return self.state / "superexec.secret"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the coordinator's Flower processes."""
        return self.state / "flwr-home"

    @property
    def gateway(self) -> Path:
        """The nginx gateway's folder (its config and runtime files)."""
        return self.state / "gateway"

    @property
    def logs(self) -> Path:
        """The coordinator's process logs."""
        return self.state / "logs"

    @property
    def audit(self) -> Path:
        """The coordinator's hash-chained audit trail (``flowerbed audit show | verify``)."""
        return self.root / "audit.jsonl"

    @property
    def gateway_access_log(self) -> Path:
        """nginx's access log of the Fleet API."""
        return self.logs / "gateway-access.log"

    @property
    def runs(self) -> Path:
        """The run folders."""
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        """``runs/NAME``; a name that is a path (``../x``, ``/abs``) or hidden is refused in one line."""
        if not RUN_NAME.fullmatch(name) or ".." in name:
            raise FlowerbedError(
                f"run name {name!r}: use lower-case letters, digits, hyphens, dots and underscores (at most 100, "
                "starting with a letter or digit), e.g. --name study-2026-q1"
            )
        return self.runs / name

    @property
    def tasks(self) -> Path:
        """The own tasks' wheels that runs of this federation use (``flowerbed run --task WHEEL`` adds one)."""
        return self.root / "tasks"

    @property
    def pidfile(self) -> Path:
        """The coordinator supervisor's record of its processes."""
        return self.state / "supervisor.json"
