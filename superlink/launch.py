"""``flower-superlink`` whose SQLite transactions wait for the database lock instead of failing.

Flower 1.42 keeps the SuperLink's state and object store in one SQLite file (WAL, a 5 s busy
timeout) and opens deferred transactions: one that reads and then writes cannot wait for the
write lock and fails at once with "database is locked" when another writer holds it. With 16
SuperNodes pushing replies at once on a 2-core coordinator that happened in the load test: a
reply was lost ("Failed to store object ... database is locked") and the round stalled.
This entry point starts Flower's own ``flower-superlink`` after two changes through SQLAlchemy's
documented pysqlite recipe: every transaction begins with ``BEGIN IMMEDIATE`` (writers queue for
the lock), and the busy timeout is 60 s; it also tallies each run's replies and notes each node's
last contact. The Flower internals it hooks live in :mod:`flowerbed.flower.superlink`, checked when
installed (a missing one stops the SuperLink with the Flower version named).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flowerbed.flower import HookError, superlink

BUSY_TIMEOUT_MS = "60000"


REPLIES_ENV = "FLOWERBED_REPLIES_DIR"  # where the SuperLink tallies each run's replies (set by the stack)
CONTACTS_FILE = "contacts.json"  # node id -> when the SuperLink last heard from it (epoch seconds)


def patch_sqlite() -> None:
    """Writers queue for SQLite's lock for up to a minute (:func:`flowerbed.flower.superlink.queue_sqlite_writers`)."""
    superlink.queue_sqlite_writers(BUSY_TIMEOUT_MS)


def patch_reply_tally(folder: Path) -> None:
    """Count each run's replies as the SuperLink stores them: trained, refused by a site, or failed.

    A Flower App's own ServerApp may finish "completed" though every site refused it; the tally
    (``folder/RUN_ID.json``) lets ``flowerbed run --app`` say so.
    """
    folder.mkdir(parents=True, exist_ok=True)
    superlink.on_reply_stored(lambda message: _tally(folder, message))


def patch_contact_log(folder: Path, every_s: float = 1.0) -> None:
    """Note when each node last reached the SuperLink (a heartbeat or a pull), in ``folder/contacts.json``.

    The ServerApp reads it to name a site that has gone dark while a round waits for it, with the
    time since its last contact.
    """
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

    superlink.on_node_contact(note)


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
    """Flower's ``flower-superlink`` with the kit's hooks; a hook that cannot be installed stops it in one line."""
    try:
        patch_sqlite()
        replies = os.environ.get(REPLIES_ENV)
        if replies:
            patch_reply_tally(Path(replies))
            patch_contact_log(Path(replies))
    except HookError as exc:
        raise SystemExit(exc.message) from None
    superlink.run_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
