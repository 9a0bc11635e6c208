"""``flower-superlink`` whose SQLite transactions wait for the database lock instead of failing.

Flower 1.42 keeps the SuperLink's state and object store in one SQLite file (WAL, a 5 s busy
timeout) and opens deferred transactions: one that reads and then writes cannot wait for the
write lock and fails at once with "database is locked" when another writer holds it. With 16
SuperNodes pushing replies at once on a 2-core coordinator that happened in the load test: a
reply was lost ("Failed to store object ... database is locked") and the round stalled.
This entry point starts Flower's own ``flower-superlink`` after two changes through SQLAlchemy's
documented pysqlite recipe: every transaction begins with ``BEGIN IMMEDIATE`` (writers queue for
the lock), and the busy timeout is 60 s. It edits no Flower file but wraps
``flwr.supercore.sql_mixin.create_engine``, a flwr 1.42 internal: flowerbed pins
``flwr>=1.42,<1.43`` and tests/test_load.py checks it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_MS = "60000"


def patch_sqlite() -> None:
    from flwr.supercore import sql_mixin
    from sqlalchemy import event

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS")  # noqa: B009 - a flwr 1.42 internal, read where it is used
    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[attr-defined,assignment]
        (name, BUSY_TIMEOUT_MS if name == "busy_timeout" else value) for name, value in pragmas
    )
    original = sql_mixin.create_engine  # type: ignore[attr-defined]

    def create_engine(url: Any, **kwargs: Any) -> Any:
        engine = original(url, **kwargs)
        if engine.dialect.name == "sqlite" and ":memory:" not in str(url):

            def autocommit(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)

            def immediate(connection: Any) -> None:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

            event.listen(engine, "connect", autocommit)
            event.listen(engine, "begin", immediate)
        return engine

    sql_mixin.create_engine = create_engine  # type: ignore[attr-defined]


REPLIES_ENV = "FLOWERBED_REPLIES_DIR"  # where the SuperLink tallies each run's replies (set by the stack)


def patch_reply_tally(folder: Path) -> None:
    """Count each run's replies as the SuperLink stores them: trained, refused by a site, or failed.

    A Flower App's own ServerApp may finish "completed" though every site refused it; the tally
    (``folder/RUN_ID.json``) lets ``flowerbed run --app`` say so. Hooks
    ``SqlLinkState.store_message_res`` (flwr 1.42 internal): a hook that cannot be installed stops the
    SuperLink with the Flower version named, instead of leaving the coordinator blind.
    """
    import flwr
    from flwr.server.superlink.linkstate import sql_linkstate

    cls = getattr(sql_linkstate, "SqlLinkState", None)
    original = getattr(cls, "store_message_res", None)
    if cls is None or original is None:
        raise SystemExit(f"flowerbed cannot count replies with Flower {flwr.__version__}: install flwr 1.42")
    folder.mkdir(parents=True, exist_ok=True)

    def store_message_res(self: Any, message: Any) -> Any:
        stored = original(self, message)
        if stored is not None:
            _tally(folder, message)
        return stored

    cls.store_message_res = store_message_res


CONTACTS_FILE = "contacts.json"  # node id -> when the SuperLink last heard from it (epoch seconds)


def patch_contact_log(folder: Path, every_s: float = 1.0) -> None:
    """Note when each node last reached the SuperLink (a heartbeat or a pull), in ``folder/contacts.json``.

    The ServerApp reads it to name a site that has gone dark while a round waits for it, with the
    time since its last contact. Hooks ``SqlLinkState.acknowledge_node_heartbeat`` and
    ``get_message_ins`` (flwr 1.42 internals); one that cannot be installed stops the SuperLink.
    """
    import flwr
    from flwr.server.superlink.linkstate import sql_linkstate

    cls = getattr(sql_linkstate, "SqlLinkState", None)
    names = ("acknowledge_node_heartbeat", "get_message_ins")
    if cls is None or not all(callable(getattr(cls, n, None)) for n in names):
        raise SystemExit(f"flowerbed cannot note node contacts with Flower {flwr.__version__}: install flwr 1.42")
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, float] = {}
    written = [0.0]

    def note(node_id: int) -> None:
        now = time.time()
        seen[str(node_id)] = now
        if now - written[0] >= every_s:
            written[0] = now
            tmp = folder / (CONTACTS_FILE + ".tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(seen), encoding="utf-8")
                tmp.replace(folder / CONTACTS_FILE)

    for name in names:
        original = getattr(cls, name)

        def hooked(self: Any, node_id: int, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            note(node_id)
            return _original(self, node_id, *args, **kwargs)

        setattr(cls, name, hooked)


def _tally(folder: Path, message: Any) -> None:
    path = folder / f"{message.metadata.run_id}.json"
    try:
        tally = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        tally = {"trained": 0, "refused": 0, "failed": 0, "reasons": []}
    from flowerbed.protocol import REFUSED_CODE  # a site refused the run (not approved, or against its policy)

    if not message.has_error():
        tally["trained"] += 1
    else:
        tally["refused" if message.error.code == REFUSED_CODE else "failed"] += 1
        reason = str(message.error.reason)
        if reason not in tally["reasons"] and len(tally["reasons"]) < 20:
            tally["reasons"].append(reason)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):  # a full disk loses a count, never a reply
        tmp.write_text(json.dumps(tally), encoding="utf-8")
        tmp.replace(path)


def main() -> int:
    patch_sqlite()
    replies = os.environ.get(REPLIES_ENV)
    if replies:
        patch_reply_tally(Path(replies))
        patch_contact_log(Path(replies))
    from flwr.superlink.cli import flower_superlink

    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
