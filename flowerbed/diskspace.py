"""Free space, and the one line a full disk is reported with.

A full disk must never leave a half-written file behind or take the coordinator down: writers
check the space they need first where they can (:func:`ensure_space`) and turn ENOSPC into
:class:`DiskFullError`, whose message names the device, the path, what is free and what was needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from flowerbed.errors import FlowerbedError

MB = 1024 * 1024


class DiskFullError(FlowerbedError):
    """No space left where a run writes: the message names the device, free and needed space."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    return shutil.disk_usage(here).free


def device_of(path: Path) -> str:
    """``DEVICE at MOUNT`` for the file system holding ``path`` (from /proc/mounts), or the mount alone."""
    target = path.resolve()
    best, device = Path("/"), ""
    try:
        lines = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 2:
            continue
        mount = Path(parts[1].replace("\\040", " "))
        if target.is_relative_to(mount) and len(mount.parts) >= len(best.parts):
            best, device = mount, parts[0]
    return f"{device} at {best}" if device else str(best)


def no_space(path: Path, needed: int) -> DiskFullError:
    """The error for a write of ``needed`` bytes at ``path`` that does not fit."""
    free = free_bytes(path)
    return DiskFullError(
        f"no space left on {device_of(path)} ({path}): {free / MB:.1f} MB free, the next write needs "
        f"{max(needed, 1) / MB:.1f} MB; free space there, then `flowerbed run --resume NAME` goes on"
    )


def ensure_space(path: Path, needed: int) -> None:
    """Raise :class:`DiskFullError` unless ``needed`` bytes (plus a margin of 1 MB) fit at ``path``."""
    if free_bytes(path) < needed + MB:
        raise no_space(path, needed)


def is_disk_full(exc: OSError) -> bool:
    """True when ``exc`` means the disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole, or keeps what it had: temporary file, fsync, rename."""
    write_atomic_with(path, lambda handle: handle.write(data), len(data))


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object], needed: int) -> None:
    """``path`` holds whatever ``write`` writes to the file handle it is given, whole, or keeps what it had
    (temporary file, fsync, rename), with nothing of it held in memory first. A full disk is a
    :class:`DiskFullError` naming ``needed`` bytes, also when ``write`` wraps the OSError (torch.save does)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(cause, OSError) and is_disk_full(cause):
            raise no_space(path, needed) from None
        raise


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` whole or not at all: a failed write is cut back to where the file ended."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides (077: 0600)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            os.ftruncate(fd, start)
            if is_disk_full(exc):
                raise no_space(path, len(data)) from None
            raise
    finally:
        os.close(fd)
