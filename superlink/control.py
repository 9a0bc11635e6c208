"""The local SuperLink's Control API, called in this process: no ``flwr`` process per question.

``flowerbed run`` and the coordinator's run keeper ask for a run's status every few seconds; each
``flwr ls`` started a Python interpreter that imported flwr (about a second of CPU). This uses
Flower's own Control API client (:func:`flowerbed.flower.superlink.control_client`) over the same loopback TLS
address and CA as ``flwr`` does. Errors become :class:`FlowerbedError` in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flowerbed.errors import FlowerbedError
from flowerbed.flower import HookError, superlink

T = TypeVar("T")


@dataclass
class ControlClient:
    """One reusable connection to the Control API at ``address`` (loopback), verified with ``ca_cert``."""

    address: str
    ca_cert: Path
    _client: Any = field(default=None, repr=False)

    def _connect(self) -> Any:
        if self._client is None:
            try:
                ca = self.ca_cert.read_bytes()
            except OSError as exc:
                raise FlowerbedError(f"cannot read the SuperLink's CA certificate {self.ca_cert}: {exc}") from None
            self._client = superlink.control_client(self.address, ca)
        return self._client

    def _ask(self, call: Callable[[Any], T], failed: str) -> T:
        """``call(client)``; a transport or API error is one line (``failed``: what did not happen) and the
        next question opens a new connection. A missing Flower internal raises its own line (HookError)."""
        client = self._connect()
        try:
            return call(client)
        except HookError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line for the caller
            self.close()
            raise FlowerbedError(f"{failed}: {type(exc).__name__}: {superlink.answer_of(exc)}") from None

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run as ``flwr ls`` shows it: ``running``, ``finished:completed``, ..."""
        found = self._ask(lambda c: superlink.list_run(c, run_id), "the SuperLink's Control API did not answer")
        if found is None:
            raise FlowerbedError(f"the SuperLink does not know run {run_id}")
        status, sub_status = found
        return f"{status}:{sub_status}" if sub_status else status

    def start_run(self, app_dir: Path) -> int:
        """Submit the Flower App in ``app_dir``; its run id."""
        return self._ask(lambda c: superlink.start_run(c, app_dir), f"the SuperLink did not start the run of {app_dir}")

    def register_node(self, public_key_pem: bytes, name: str) -> int | None:
        """Register a node key (PEM); its node id, None when the SuperLink knows the key already."""
        return self._ask(lambda c: superlink.register_node(c, public_key_pem, name),
                         f"the SuperLink did not register {name}'s node key")  # fmt: skip

    def unregister_node(self, node_id: int) -> None:
        """Unregister node ``node_id`` (its key is refused from now on)."""
        self._ask(lambda c: superlink.unregister_node(c, node_id), f"the SuperLink did not unregister node {node_id}")

    def close(self) -> None:
        """Close the connection (the next question opens a new one)."""
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None


_CLIENTS: dict[Path, ControlClient] = {}


def client_for(flwr_home: Path) -> ControlClient:
    """The Control API client of the connection ``flowerbed superlink start`` wrote into ``flwr_home``."""
    import tomllib

    from flowerbed.superlink.flwrcli import CONNECTION

    home = flwr_home.resolve()
    if home not in _CLIENTS:
        path = home / "config.toml"
        try:
            connection = tomllib.loads(path.read_text("utf-8"))["superlink"][CONNECTION]
        except (OSError, KeyError, ValueError):
            raise FlowerbedError(
                f"{path} does not name the SuperLink: start it with `flowerbed superlink start`"
            ) from None
        _CLIENTS[home] = ControlClient(connection["address"], Path(connection["root-certificates"]))
    return _CLIENTS[home]


def close_client(flwr_home: Path) -> None:
    """Close this process's connection to the SuperLink of ``flwr_home``, if any: before the SuperLink stops,
    whose HTTP server waits for its open connections to close (10 s of SIGTERM grace per stop, seen in tests)."""
    client = _CLIENTS.pop(flwr_home.resolve(), None)
    if client is not None:
        client.close()


def start_run(flwr_home: Path, app_dir: Path) -> int:
    """Submit the Flower App in ``app_dir`` to the local SuperLink (as ``flwr run APP`` does); its run id."""
    return client_for(flwr_home).start_run(app_dir)


def register_node(flwr_home: Path, public_key: Path, name: str) -> str | None:
    """Register the OpenSSH public key file ``public_key`` as site ``name``; its node id, or None when the
    SuperLink has the key already."""
    from cryptography.hazmat.primitives import serialization

    from flowerbed.certs.nodekeys import load_public_key

    key = load_public_key(public_key)  # an OpenSSH EC key, as `flwr supernode register` requires
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    node_id = client_for(flwr_home).register_node(pem, name)
    return None if node_id is None else str(node_id)


def unregister_node(flwr_home: Path, node_id: int) -> None:
    """Unregister node ``node_id`` at the local SuperLink."""
    client_for(flwr_home).unregister_node(node_id)


def run_status(flwr_home: Path, run_id: int) -> str:
    """Flower's status of run ``run_id`` at the local SuperLink (one reused connection per federation)."""
    return client_for(flwr_home).run_status(run_id)
