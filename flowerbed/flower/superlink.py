"""The coordinator's Flower internals: the SuperLink's SQLite and state hooks, its Control API client,
and the ServerApp runtime that the warm executor forks.

- ``sql_mixin.create_engine``/``SQLITE_PRAGMAS``: every SQLite transaction begins ``BEGIN IMMEDIATE``
  with a 60 s busy timeout (16 SuperNodes pushing at once lost a reply to "database is locked").
- ``SqlLinkState.store_message_res``: each stored reply is passed to the kit (the run's reply tally).
- ``SqlLinkState.acknowledge_node_heartbeat`` and ``get_message_ins``: each node's last contact.
- ``ControlHttpClient`` and ``ListRunsRequest``: a run's status without a ``flwr`` process.
- ``build_fab_from_disk``, ``Fab`` and ``StartRunRequest``: the kit's run submitted as ``flwr run`` submits it,
  without a ``flwr`` process (two seconds per run).
- ``RegisterNodeRequest``/``UnregisterNodeRequest``: a site's node key registered or unregistered without a
  ``flwr`` process (a second of CPU per site at every coordinator start).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowerbed.flower import declare, entry, module, resolve, trace

SQL_ENGINE = declare("flwr.supercore.sql_mixin", "create_engine", "queue SQLite writers at the SuperLink")
SQL_PRAGMAS = declare("flwr.supercore.sql_mixin", "SQLITE_PRAGMAS", "set the SuperLink's SQLite busy timeout")
STORE_REPLY = declare(
    "flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState.store_message_res",
    "count each run's replies at the SuperLink", "self", "message",
)  # fmt: skip
HEARTBEAT = declare(
    "flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState.acknowledge_node_heartbeat",
    "note when each node last reached the SuperLink", "self", "node_id",
)  # fmt: skip
PULL_INS = declare(
    "flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState.get_message_ins",
    "note when each node last reached the SuperLink", "self", "node_id",
)  # fmt: skip
SUPERLINK_MAIN = declare("flwr.superlink.cli", "flower_superlink", "start flower-superlink")
SERVERAPP_MAIN = declare("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp", "run a ServerApp in the warm executor")
CONTROL_CLIENT = declare(
    "flwr.supercore.control.control_http_client", "ControlHttpClient.from_server_address",
    "ask the SuperLink's Control API for a run's status", "server_address", "insecure", "root_certificates",
)  # fmt: skip
VERSION_INTERCEPTOR = declare(
    "flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", "ask the SuperLink's Control API", "component_name"
)
LIST_RUNS = declare("flwr.proto.control_pb2", "ListRunsRequest", "ask the SuperLink's Control API for a run's status")
REGISTER_NODE = declare("flwr.proto.control_pb2", "RegisterNodeRequest", "register a site's node key at the SuperLink")
UNREGISTER_NODE = declare(
    "flwr.proto.control_pb2", "UnregisterNodeRequest", "unregister a revoked site's node", path=False
)
BUILD_FAB = declare("flwr.cli.build", "build_fab_from_disk", "submit a run to the SuperLink", "app")
FAB = declare("flwr.supercore.fab", "Fab", "submit a run to the SuperLink", "hash_str", "content", "verifications")
START_RUN = declare("flwr.proto.control_pb2", "StartRunRequest", "submit a run to the SuperLink")
KEY_IN_USE = "already in use"  # the SuperLink's answer (HTTP 412) to a key it has registered before


def queue_sqlite_writers(busy_timeout_ms: str) -> None:
    """Every SQLite transaction of the SuperLink begins ``BEGIN IMMEDIATE``, with this busy timeout.

    SQLAlchemy's documented pysqlite recipe, around Flower's own ``create_engine``: writers queue for
    the lock instead of failing at once when a deferred transaction cannot upgrade.
    """
    from sqlalchemy import event

    mixin = module(SQL_ENGINE)
    pragmas = resolve(SQL_PRAGMAS)
    trace(SQL_PRAGMAS)
    mixin.SQLITE_PRAGMAS = tuple((n, busy_timeout_ms if n == "busy_timeout" else v) for n, v in pragmas)
    original = resolve(SQL_ENGINE)

    def create_engine(url: Any, **kwargs: Any) -> Any:
        trace(SQL_ENGINE)
        engine = original(url, **kwargs)
        if engine.dialect.name == "sqlite" and ":memory:" not in str(url):

            def autocommit(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)

            def immediate(connection: Any) -> None:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

            event.listen(engine, "connect", autocommit)
            event.listen(engine, "begin", immediate)
        return engine

    mixin.create_engine = create_engine


def on_reply_stored(callback: Callable[[Any], None]) -> None:
    """``callback(message)`` after the SuperLink stored each reply (a Flower ``Message``)."""
    cls = module(STORE_REPLY)
    original = resolve(STORE_REPLY)

    def store_message_res(self: Any, message: Any) -> Any:
        trace(STORE_REPLY)
        stored = original(self, message)
        if stored is not None:
            callback(message)
        return stored

    cls.store_message_res = store_message_res


def on_node_contact(callback: Callable[[int], None]) -> None:
    """``callback(node_id)`` each time a node sends a heartbeat or asks for its messages."""
    for hook in (HEARTBEAT, PULL_INS):
        cls = module(hook)
        original = resolve(hook)

        def hooked(self: Any, node_id: int, *args: Any, _original: Any = original, _hook: Any = hook,
                   **kwargs: Any) -> Any:  # fmt: skip
            trace(_hook)
            callback(node_id)
            return _original(self, node_id, *args, **kwargs)

        setattr(cls, hook.name.rsplit(".", 1)[1], hooked)


def run_superlink() -> None:
    """Flower's own ``flower-superlink`` (it reads sys.argv)."""
    entry(SUPERLINK_MAIN)()


def serverapp_main() -> Callable[[], None]:
    """Flower's own ``flwr-serverapp`` entry (the warm executor runs it in each fork)."""
    return entry(SERVERAPP_MAIN)


def control_client(address: str, root_certificates: bytes) -> Any:
    """Flower's Control API client over TLS, as the ``flwr`` CLI makes it (closed with ``close()``)."""
    factory = resolve(CONTROL_CLIENT)
    interceptor = resolve(VERSION_INTERCEPTOR)
    trace(CONTROL_CLIENT)
    trace(VERSION_INTERCEPTOR)
    return factory(
        server_address=address,
        insecure=False,
        root_certificates=root_certificates,
        interceptors=[interceptor(component_name="flwr CLI")],
    )


def start_run(client: Any, app_dir: Path) -> int:
    """Submit the Flower App in ``app_dir`` as ``flwr run APP`` does (its FAB, no config overrides); the run id.
    Errors propagate (the caller says them)."""
    from flwr.common.serde import fab_to_proto

    fab_bytes = resolve(BUILD_FAB)(app_dir)
    fab = resolve(FAB)(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = resolve(START_RUN)
    for hook in (BUILD_FAB, FAB, START_RUN):
        trace(hook)
    response = client.StartRun(request(fab=fab_to_proto(fab)))
    if not response.HasField("run_id"):
        raise RuntimeError("the SuperLink started no run")
    return int(response.run_id)


def register_node(client: Any, public_key_pem: bytes, name: str) -> int | None:
    """Register a node's public key (PEM, SubjectPublicKeyInfo, as ``flwr supernode register`` sends it); its
    node id, or None when the SuperLink has the key already. Other errors propagate (the caller says them)."""
    request = resolve(REGISTER_NODE)
    trace(REGISTER_NODE)
    try:
        response = client.RegisterNode(request(public_key=public_key_pem, name=name))
    except Exception as exc:
        if KEY_IN_USE in answer_of(exc).lower():
            return None
        raise
    return int(response.node_id)


def unregister_node(client: Any, node_id: int) -> None:
    """Unregister a node: the SuperLink refuses its key from now on."""
    request = resolve(UNREGISTER_NODE)
    trace(UNREGISTER_NODE)
    client.UnregisterNode(request(node_id=node_id))


def answer_of(exc: Exception) -> str:
    """The error and the body of the SuperLink's HTTP answer, if the error carries one."""
    response = getattr(exc, "response", None)
    body = getattr(response, "text", "") if response is not None else ""
    return f"{exc} {body}"


def list_run(client: Any, run_id: int) -> tuple[str, str] | None:
    """``(status, sub_status)`` of ``run_id`` from the Control API, None when the SuperLink has no such run.

    Transport errors propagate (the caller says what they mean); a missing hook raises HookError.
    """
    request = resolve(LIST_RUNS)
    trace(LIST_RUNS)
    response = client.ListRuns(request(run_id=run_id))
    run = response.run_dict.get(run_id)
    if run is None:
        return None
    return str(run.status.status), str(run.status.sub_status or "")
