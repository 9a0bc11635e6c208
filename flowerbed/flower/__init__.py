"""Flower's internals, behind one door: every name the kit hooks or reaches beyond Flower's public API.

Flower's public API is ``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp`` and ``flwr.common``; the
rest of flowerbed uses only those and this package. Here each internal name is declared once as a
:class:`Hook` (module, attribute, the parameters the kit relies on) and fetched through
:func:`resolve`, which fails closed: a name that is gone or whose signature changed raises
:class:`HookError`, a one-line :class:`~flowerbed.errors.FlowerbedError` that names the installed
Flower version and the supported one. ``tests/test_flower_hooks.py`` is the canary: every declared
hook resolves, and a federation proves each is called on the kit's path (``FLOWERBED_HOOK_TRACE``).

One module per process that hooks: :mod:`.superlink` (the SuperLink, its Control API client and the
ServerApp's runtime), :mod:`.supernode` (the SuperNode, its Fleet client, the ClientApp runtime
behind the approval gate), :mod:`.superexec` (the warm fork executor), :mod:`.secagg` (the legacy
SecAgg+ workflow and mod), :mod:`.arrays` (large arrays read in one copy, in the ServerApp and the
ClientApp) and :mod:`.compat` (helpers from Flower's internal modules).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerbed.errors import FlowerbedError

SUPPORTED = "1.42"  # the minor version these hooks were written for (pyproject pins flwr>=1.42,<1.43)
TRACE_ENV = "FLOWERBED_HOOK_TRACE"  # a file: each process appends the name of every hook it called, once


def version() -> str:
    """The installed Flower's version (``unknown`` when flwr is not importable)."""
    try:
        import flwr

        return str(flwr.__version__)
    except ImportError:
        return "unknown"


def unsupported(what: str, detail: str = "") -> str:
    """The one line that says a hook is missing, naming both Flower versions and the fix."""
    why = f" ({detail})" if detail else ""
    return (
        f"flowerbed cannot {what} with Flower {version()}{why}: it supports flwr {SUPPORTED}.x; "
        f"install it with pip install 'flwr>={SUPPORTED},<1.43'"
    )


class HookError(FlowerbedError):
    """A Flower internal the kit relies on is missing or changed (another Flower version)."""


@dataclass(frozen=True)
class Hook:
    """One Flower internal: ``module``'s ``name`` (dotted for a class attribute), and what it is for."""

    module: str
    name: str
    purpose: str
    params: tuple[str, ...] = ()  # parameter names the kit passes or reads (a subset, in any order)
    path: bool = True  # False: resolved, but not on every federation's path (the canary checks it exists)
    owner: str = ""  # the module of this package that declared it

    @property
    def key(self) -> str:
        """``module:name``, as the hook trace writes it."""
        return f"{self.module}:{self.name}"


HOOKS: list[Hook] = []


def declare(module: str, name: str, purpose: str, *params: str, path: bool = True) -> Hook:
    """Declare a hook once, at import of the module that uses it; returns it for :func:`resolve`."""
    hook = Hook(module, name, purpose, tuple(params), path, sys._getframe(1).f_globals.get("__name__", ""))
    if hook not in HOOKS:
        HOOKS.append(hook)
    return hook


def resolve(hook: Hook) -> Any:
    """The hooked object, checked: present, and (for a callable) taking the declared parameters."""
    try:
        target: Any = importlib.import_module(hook.module)
        for part in hook.name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise HookError(unsupported(hook.purpose, f"{hook.key} is missing: {exc}")) from None
    if hook.params:
        try:
            names = set(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            names = set()
        missing = [p for p in hook.params if p not in names]
        if missing:
            raise HookError(unsupported(hook.purpose, f"{hook.key} takes no {', '.join(missing)}"))
    return target


def module(hook: Hook) -> Any:
    """The module that holds ``hook`` (to rebind the name there), after :func:`resolve` checked it."""
    resolve(hook)
    target: Any = importlib.import_module(hook.module)
    for part in hook.name.split(".")[:-1]:
        target = getattr(target, part)
    return target


_TRACED: set[tuple[str, str]] = set()


def trace(hook: Hook) -> None:
    """Note that this process called ``hook`` (once per trace file), in ``FLOWERBED_HOOK_TRACE``'s file when it
    is set (a long-lived process, e.g. a test worker, may see several)."""
    path = os.environ.get(TRACE_ENV, "")
    if (path, hook.key) in _TRACED:
        return
    _TRACED.add((path, hook.key))
    if path:
        with contextlib.suppress(OSError), Path(path).open("a", encoding="utf-8") as handle:
            handle.write(hook.key + "\n")


def traced_time(hook: Hook, base: Any, sleep: Callable[[float], None]) -> Any:
    """A ``time`` stand-in for a Flower loop: ``base``'s, except ``sleep``, noted in the trace when taken."""

    class Clock:
        def __getattr__(self, name: str) -> Any:
            if name != "sleep":
                return getattr(base, name)
            trace(hook)
            return sleep

    return Clock()


def entry(hook: Hook) -> Callable[[], None]:
    """A Flower command's main function (it reads sys.argv), checked now and traced when it runs."""
    main = resolve(hook)

    def run() -> None:
        trace(hook)
        main()

    return run


def check_all() -> list[str]:
    """Every declared hook of every module here, resolved: the problems (empty when Flower fits)."""
    from flowerbed.flower import arrays, compat, secagg, superexec, superlink, supernode  # noqa: F401  (declare all)

    problems = []
    for hook in HOOKS:
        try:
            resolve(hook)
        except HookError as exc:
            problems.append(exc.message)
    return problems
