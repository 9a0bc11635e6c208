"""Flower's SuperExec internals: the executor that launches tasks, and the object pull back-off.

- ``run_superexec.get_executor``: ``flower-superexec``'s main loop takes the kit's fork executor.
- ``TASK_TYPE_TO_COMMAND`` / ``TASK_TYPE_TO_APPIO_API_ADDRESS_ARG``: the command line Flower's
  subprocess executor would start, so a fork runs exactly that.
- ``LaunchResult``: what a launch answers.
- ``run_superexec``'s ``time.sleep``: the task loop polls quickly only while tasks come (idle, once a
  second, as Flower's default).
- ``pull_objects`` / ``pull_and_inflate_object_from_tree`` keyword defaults: the first retry of an
  object that is not there yet after 0.05 s instead of 1 s; a task's tries without a count limit;
  the ServerApp's wait for a reply's objects bounded by what is left of its round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from flowerbed.flower import declare, module, resolve, trace, traced_time

GET_EXECUTOR = declare("flwr.supercore.superexec.run_superexec", "get_executor", "fork tasks from a warm process")
SUPEREXEC_MAIN = declare("flwr.supercore.cli.flower_superexec", "flower_superexec", "start flower-superexec")
TASK_COMMAND = declare("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND", "start a task as Flower would")
TASK_ADDRESS_ARG = declare(
    "flwr.supercore.constant", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG", "start a task as Flower would"
)
LOOP_TIME = declare(
    "flwr.supercore.superexec.run_superexec", "time.sleep", "poll for tasks quickly only while they come"
)
LAUNCH_RESULT = declare("flwr.supercore.superexec.executor", "LaunchResult", "launch a task in a fork")
PULL_OBJECTS = declare(
    "flwr.supercore.inflatable.inflatable_utils", "pull_objects", "pull a message's objects sooner",
    "initial_backoff", "backoff_cap", "max_time",
)  # fmt: skip
PULL_TREE = declare(
    "flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
    "pull a message's objects sooner", "initial_backoff", "backoff_cap", "max_tries_per_object",
)  # fmt: skip


def task_command(task_type: Any) -> tuple[str, str]:
    """The command Flower starts for ``task_type`` and the flag that names its AppIO API address."""
    trace(TASK_COMMAND)
    trace(TASK_ADDRESS_ARG)
    return resolve(TASK_COMMAND)[task_type], resolve(TASK_ADDRESS_ARG)[task_type]


def launched(error: str = "") -> Any:
    """Flower's ``LaunchResult``: accepted, or failed with ``error``."""
    result = resolve(LAUNCH_RESULT)
    trace(LAUNCH_RESULT)
    return result.failed(error) if error else result.accepted()


def object_pull_backoff(initial_s: float, cap_s: float | None, *, endless: bool = False) -> None:
    """The default first wait (and, when given, the longest) between tries of a pull of missing objects.

    ``endless``: no limit on the tries of one object (Flower's time limit, 2 h, still holds).
    """
    for hook in (PULL_OBJECTS, PULL_TREE):
        defaults = resolve(hook).__kwdefaults__
        if defaults is not None and "initial_backoff" in defaults:
            trace(hook)
            defaults["initial_backoff"] = initial_s
            if cap_s is not None:
                defaults["backoff_cap"] = cap_s
            if endless and "max_tries_per_object" in defaults:
                defaults["max_tries_per_object"] = None


@contextlib.contextmanager
def object_pull_deadline(seconds: float) -> Iterator[None]:
    """Within the block, a pull of a message's objects gives up after ``seconds`` (Flower's default: 2 h).

    Flower's ``Grid.pull_messages`` hands out a reply as soon as its message is stored and then waits
    inside for its objects: a reply whose upload was cut (a gateway restart, a link gone) held the
    ServerApp until the SuperLink's object-push session expired (180 s), whatever the round's timeout,
    and the replies behind it with it. Bounded, the cut reply ends as Flower's "unavailable" error.
    """
    defaults = resolve(PULL_OBJECTS).__kwdefaults__
    if defaults is None or "max_time" not in defaults:
        yield
        return
    trace(PULL_OBJECTS)
    before = defaults["max_time"]
    defaults["max_time"] = max(seconds, 0.0) if before is None else min(max(seconds, 0.0), before)
    try:
        yield
    finally:
        defaults["max_time"] = before


def pace_task_polls(pause: Callable[[float], None]) -> None:
    """Flower's task loop sleeps through ``pause`` (called with the loop's own poll interval)."""
    loop = module(GET_EXECUTOR)  # run_superexec, whose ``time`` the loop sleeps through
    resolve(LOOP_TIME)  # the loop still sleeps through its module's ``time``
    loop.time = traced_time(LOOP_TIME, loop.time, pause)


def run_superexec(executor: Any) -> None:
    """Flower's own ``flower-superexec`` (it reads sys.argv), launching its tasks through ``executor``."""
    loop = module(GET_EXECUTOR)
    resolve(GET_EXECUTOR)
    main = resolve(SUPEREXEC_MAIN)

    def get_executor(*_args: Any, **_kwargs: Any) -> Any:
        trace(GET_EXECUTOR)
        return executor

    loop.get_executor = get_executor
    trace(SUPEREXEC_MAIN)
    main()
