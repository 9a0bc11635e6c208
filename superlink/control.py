"""The local SuperLink's Control API, called in this process: no ``flwr`` process per question.

``flowerbed run`` and the coordinator's run keeper ask for a run's status every few seconds; each
``flwr ls`` started a Python interpreter that imported flwr (about a second of CPU). This uses
Flower's own Control API client (:func:`flowerbed.flower.superlink.control_client`) over the same loopback TLS
address and CA as ``flwr`` does. Errors become :class:`FlowerbedError` in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowerbed.errors import FlowerbedError
from flowerbed.flower import HookError, superlink


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

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run as ``flwr ls`` shows it: ``running``, ``finished:completed``, ...

        A Flower internal that is missing raises its own line (HookError, naming the Flower version),
        never "the SuperLink did not answer".
        """
        client = self._connect()
        try:
            found = superlink.list_run(client, run_id)
        except HookError:
            raise
        except Exception as exc:  # noqa: BLE001 - a transport or API error: one line, the caller retries
            self.close()
            raise FlowerbedError(f"the SuperLink's Control API did not answer: {type(exc).__name__}: {exc}") from None
        if found is None:
            raise FlowerbedError(f"the SuperLink does not know run {run_id}")
        status, sub_status = found
        return f"{status}:{sub_status}" if sub_status else status

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


def run_status(flwr_home: Path, run_id: int) -> str:
    """Flower's status of run ``run_id`` at the local SuperLink (one reused connection per federation)."""
    return client_for(flwr_home).run_status(run_id)
