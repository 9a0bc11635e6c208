"""Flower's SuperExec internals: the executor that launches tasks, and the object pull back-off.

- ``run_superexec.get_executor``: ``flower-superexec``'s main loop takes the kit's fork executor.
- ``TASK_TYPE_TO_COMMAND`` / ``TASK_TYPE_TO_APPIO_API_ADDRESS_ARG``: the command line Flower's
  subprocess executor would start, so a fork runs exactly that.
- ``LaunchResult``: what a launch answers.
- ``run_superexec``'s ``time.sleep``: the task loop polls quickly only while tasks come (idle, once a
  second, as Flower's default).
- ``pull_objects`` / ``pull_and_inflate_object_from_tree`` keyword defaults: the first retry of an
  object that is not there yet after 0.05 s instead of 1 s.
"""

from __future__ import annotations

from collections.abc import Callable
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
    "initial_backoff", "backoff_cap",
)  # fmt: skip
PULL_TREE = declare(
    "flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
    "pull a message's objects sooner", "initial_backoff", "backoff_cap",
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


def object_pull_backoff(initial_s: float, cap_s: float | None) -> None:
    """The default first wait (and, when given, the longest) between tries of a pull of missing objects."""
    for hook in (PULL_OBJECTS, PULL_TREE):
        defaults = resolve(hook).__kwdefaults__
        if defaults is not None and "initial_backoff" in defaults:
            trace(hook)
            defaults["initial_backoff"] = initial_s
            if cap_s is not None:
                defaults["backoff_cap"] = cap_s


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
