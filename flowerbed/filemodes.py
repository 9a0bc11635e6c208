"""Who may read a federation's files: secrets, models and databases are the coordinator's alone.

Every ``flowerbed`` command runs with umask 077, so what the kit and the processes it starts write
is 0600 in 0700 folders. A folder made by an older version, or copied with other modes, is named by
:func:`readable_by_others` so that ``flowerbed superlink start`` can warn.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
PUBLIC_SUFFIXES = (".crt", ".pub", ".toml", ".md")  # certificates, public keys, settings, docs: no secret


def private_umask() -> None:
    """Files this process and its children create are readable by their owner only."""
    os.umask(PRIVATE_UMASK)


def readable_by_others(root: Path) -> list[Path]:
    """Files (and folders) under ``root`` that users other than the owner can read, public ones left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in dirs:
            path = here / name
            if not path.is_symlink() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                found.append(path)
        for name in files:
            path = here / name
            if name.endswith(PUBLIC_SUFFIXES) or path.is_symlink():
                continue
            if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
                found.append(path)
    return sorted(found)


def exposure_warning(root: Path) -> str | None:
    """One line naming what other users can read in ``root`` and the command that fixes it; None: nothing."""
    found = readable_by_others(root)
    if not found:
        return None
    shown = ", ".join(f"{p.relative_to(root)} ({stat.filemode(p.stat().st_mode)})" for p in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (
        f"{len(found)} file(s) or folder(s) in {root} can be read by other users: {shown}{more}; "
        f"make them private with `chmod -R go-rwx {root}`"
    )
