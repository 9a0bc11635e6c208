"""The docs are the script: the ```bash blocks of a page, in order, with their test markers.

A block may be preceded by an HTML comment the reader never sees:
``<!-- test: skip (why) -->`` (the test host cannot run it, e.g. ``git clone``; the reason is
required) or ``<!-- test: background -->`` (a command that runs until stopped, e.g. a SuperNode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\s*\n)?```bash\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    section: str
    command: str
    skip: str | None
    background: bool


def blocks(page: Path) -> list[Block]:
    """Every bash block of ``page`` with the ``## `` section it is in."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        headings = re.findall(r"^## (.+)$", before, re.M)
        marker = (match.group("marker") or "").strip()
        skip = None
        if marker.startswith("skip"):
            skip = marker.removeprefix("skip").strip(" ()")
            if not skip:
                raise ValueError(f"{page.name}: a skipped block must say why: {match.group('body')!r}")
        elif marker not in ("", "background"):
            raise ValueError(f"{page.name}: unknown test marker {marker!r}")
        found.append(Block(headings[-1] if headings else "", match.group("body").strip(), skip, marker == "background"))
    return found
