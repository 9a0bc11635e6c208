"""The one exception type of flowerbed, and its documented exit codes.

Library code raises :class:`FlowerbedError` with a message that says what is wrong
and what to do; the CLI renders it once, in one line, without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """Stable exit codes of the ``flowerbed`` command (documented in docs/cli.md)."""

    OK = 0
    ERROR = 1  # a FlowerbedError: the message says what to do
    INVALID_CONFIG = 2  # a config file or option failed validation
    PREFLIGHT_FAILED = 3  # a check before starting a process failed
    REJECTED = 4  # the SuperLink refused this node (unregistered key, wrong CA)
    RUN_FAILED = 5  # a federated run ended failed or stopped
    INTERRUPTED = 130


class FlowerbedError(Exception):
    """An error a user can act on: the message says what is wrong and what to do."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, exit_code: ExitCode | None = None, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.details = list(details)  # one line each, shown as bullets under the message

    @property
    def message(self) -> str:
        """The one-line message shown to the user."""
        return str(self.args[0])
