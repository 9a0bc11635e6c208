"""The tests' one view of running processes, from Linux's /proc: alive, children, descendants, group members.

A zombie (ended, not yet reaped) counts as gone everywhere.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None when it is gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not alive)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (its main thread's)."""
    try:
        return [int(c) for c in (PROC / str(pid) / "task" / str(pid) / "children").read_text().split()]
    except OSError:
        return []


def _all() -> dict[int, list[str]]:
    found = {}
    for stat in PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(ValueError):
            fields = _stat(stat.parent.name)
            if fields is not None:
                found[int(stat.parent.name)] = fields
    return found


def _tree(pid: int, table: dict[int, list[str]]) -> list[int]:
    """``pid`` and every process of ``table`` below it (bounded at 10,000)."""
    below: dict[int, list[int]] = {}
    for child, fields in table.items():
        below.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(below.get(current, []))
    return found


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, whatever their process groups (bounded at 10,000)."""
    return _tree(pid, _all())


def cpu_below(pid: int) -> dict[int, float]:
    """CPU seconds (user + system, with those of the children each has reaped) of every live process
    below ``pid``, ``pid`` itself left out."""
    tick = os.sysconf("SC_CLK_TCK")
    table = _all()
    return {p: sum(int(f) for f in table[p][11:15]) / tick for p in _tree(pid, table) if p != pid}


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    return sorted(pid for pid, fields in _all().items() if int(fields[2]) == pgid and fields[0] != "Z")


def memory_holds(pid: int, needles: list[bytes], *, limit: int = 1 << 30) -> list[bytes]:
    """The needles found in the private writable memory of ``pid`` (heap, anonymous maps, stacks): where a
    process keeps what it computed or received. Mapped files (libraries) are left out. Needs ptrace access
    to ``pid`` (root, or its own user with ptrace_scope 0)."""
    found: list[bytes] = []
    try:
        maps = (PROC / str(pid) / "maps").read_text().splitlines()
        mem = (PROC / str(pid) / "mem").open("rb", buffering=0)
    except OSError:
        return found
    with mem:
        for line in maps:
            fields = line.split()
            if len(fields) < 5 or not fields[1].startswith("rw") or (len(fields) > 5 and fields[5].startswith("/")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > limit:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found += [n for n in needles if n not in found and n in data]
    return found
