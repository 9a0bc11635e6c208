"""The marker that a site's ClientApp puts before each line meant for the site's own console."""

import sys

TASK_EVENT = "flowerbed-task:"


def site_event(text: str) -> None:
    """A line for the site's own console: the SuperNode supervisor shows and logs every such line."""
    print(f"{TASK_EVENT} {text}", file=sys.stderr, flush=True)  # noqa: T201 - read by the supervisor
