"""Writing key material: private files are created 0600, never chmod-ed after the fact."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from flowerbed.errors import FlowerbedError

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse to replace unless asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and path.exists():
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except FileExistsError:
        raise FlowerbedError(f"{path} already exists: refusing to overwrite a private key") from None
    except OSError as exc:
        raise FlowerbedError(f"cannot create private file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != PRIVATE_MODE:
            raise FlowerbedError(f"{path} was created with mode {mode:o}, not 600: check the file system's umask/ACLs")


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def check_private_mode(path: Path) -> str | None:
    """A problem description when a private key file is readable by others, else None."""
    if os.name != "posix":
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:o}: other users can read it; run `chmod 600 {path}`"
    return None
