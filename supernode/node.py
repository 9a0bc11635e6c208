"""``flower-supernode`` with a quick pull right after each reply: the next round's task is seen in a blink.

Flower 1.42's SuperNode asks the SuperLink for a task, and when there is none it sleeps 3 s
(``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``, no setting). Right after a site
sends its reply the next round's task is not there yet (the ServerApp still waits for the other
sites), so every round pays up to those 3 s at every site. This runs Flower's own ``flower-supernode``
(same flags) with two changes: after it sent a reply, it asks every ``FLOWERBED_PULL_S`` (0.25 s
by default) for 3 s, then less and less often (0.5, 1, 2 s), and Flower's 3 s again after
``QUICK_FOR_S``; and while a task runs,
the SuperNode looks for its reply every 0.05 s instead of 0.5 s (its own local state, no network).
An idle site polls exactly as Flower does.

The Flower internals it hooks (the loop module's ``time`` and ``_push_messages``) live in
:mod:`flowerbed.flower.supernode`, checked when installed; every federation test runs it.
``FLOWERBED_PULL_S=3`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

PULL_ENV = "FLOWERBED_PULL_S"
ALIVE_ENV = "FLOWERBED_ALIVE_FILE"  # touched on each turn of the pull loop: its supervisor sees it go silent
FLOWER_IDLE_S = 3  # the sleep Flower's pull loop takes when there is no task (flwr 1.42)
FLOWER_REPLY_WAIT_S = 0.5  # how often Flower looks for the task's reply (and its objects) to send
REPLY_WAIT_S = 0.05
QUICK_FOR_S = 10.0  # after a reply: the other sites may take a few seconds longer
FLAT_S = 3.0  # after a reply: ask every quick_s this long, then less and less often


class PullClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop; only ``sleep(3)`` changes.

    After a reply it asks every ``quick_s`` for ``FLAT_S`` (the next round's task is usually a moment
    away: the other sites finish, the ServerApp aggregates), then less and less often (doubling up
    to Flower's 3 s), and every 3 s once ``QUICK_FOR_S`` passed.
    """

    def __init__(self, quick_s: float, alive: str = "") -> None:
        self.quick_s = quick_s
        self.replied_at = -1e9
        self.alive = alive
        self.touched = 0.0

    def idle_sleep(self, since_reply: float) -> float:
        """How long to wait before asking again, ``since_reply`` seconds after this site's last reply."""
        if since_reply >= QUICK_FOR_S:
            return FLOWER_IDLE_S
        step = self.quick_s
        while step < FLOWER_IDLE_S and step <= since_reply - FLAT_S:
            step *= 2
        return min(step, FLOWER_IDLE_S)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Flower's sleep, shortened after a reply and while a task runs; marks the loop alive."""
        now = time.monotonic()
        if self.alive and now - self.touched >= 1.0:  # the loop turns: it asked, or it waits for a task's reply
            self.touched = now
            with contextlib.suppress(OSError):
                Path(self.alive).touch()
        if seconds == FLOWER_IDLE_S:
            seconds = self.idle_sleep(time.monotonic() - self.replied_at)
        elif seconds == FLOWER_REPLY_WAIT_S:  # a task runs: its reply is sent within 0.05 s, not 0.5 s
            seconds = REPLY_WAIT_S
        time.sleep(seconds)


def quick_s() -> float:
    """The quick pull interval from FLOWERBED_PULL_S (0.05-3 s, default 0.25 s)."""
    try:
        value = float(os.environ.get(PULL_ENV, "0.25"))
    except ValueError:
        return 0.25
    return min(max(value, 0.05), float(FLOWER_IDLE_S))


def main() -> None:
    """Flower's ``flower-supernode`` with the quick pull; a hook that cannot be installed stops it in one line."""
    from flowerbed.flower import HookError, supernode
    from flowerbed.warmexec import quick_object_pulls

    clock = PullClock(quick_s(), os.environ.get(ALIVE_ENV, ""))

    def replied() -> None:
        clock.replied_at = time.monotonic()

    try:
        quick_object_pulls()  # the SuperNode reads each task's objects from the SuperLink
        supernode.install_pull_clock(clock, replied)
    except HookError as exc:
        raise SystemExit(exc.message) from None
    supernode.run_supernode()


if __name__ == "__main__":
    main()
