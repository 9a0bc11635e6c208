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

import sys
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


def main() -> int:
    patch_sqlite()
    from flwr.superlink.cli import flower_superlink

    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
