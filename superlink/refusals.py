"""Node keys the SuperLink refused, named on the coordinator's console.

Flower logs an unknown key's activation only in the SuperLink's own log (``No SuperNode found with
the given public key``, with the key's PEM). :class:`RefusalWatch` reads the new lines of that log
on each tick of the coordinator's supervisor and names each refused key once per quarter hour: its
fingerprint, and the site it belongs to when the federation knows it (registered or revoked).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flowerbed.certs.nodekeys import load_public_key, public_fingerprint
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout

UNKNOWN_KEY = "No SuperNode found with the given public key"
PEM = re.compile(r"(-----BEGIN PUBLIC KEY-----(?:\\n|\n)[A-Za-z0-9+/=\\n\n]+?-----END PUBLIC KEY-----)")
REPEAT_S = 900.0


def refused_keys(text: str) -> list[bytes]:
    """The PEM of each key whose activation was refused as unknown, in the order of ``text``'s lines."""
    found = []
    for line in text.splitlines():
        if UNKNOWN_KEY in line:
            match = PEM.search(line)
            if match:
                found.append(match.group(1).replace("\\n", "\n").encode("ascii") + b"\n")
    return found


def known_sites(layout: FederationLayout) -> dict[str, str]:
    """Fingerprint -> ``site NAME`` or ``site NAME, revoked``, from the federation's node keys."""
    out = {}
    for folder, note in ((layout.nodes, ""), (layout.nodes / "revoked", ", revoked")):
        for pub in sorted(folder.glob("*.key.pub")):
            try:
                fingerprint = public_fingerprint(load_public_key(pub))
            except FlowerbedError:
                continue
            site = pub.name.removesuffix(".key.pub").split("-", 1)[-1] if note else pub.name.removesuffix(".key.pub")
            out[fingerprint] = f"site {site}{note}"
    return out


def describe(layout: FederationLayout, pem: bytes) -> str:
    """One console line for a refused key."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "the SuperLink refused a node key that is not an EC key"
    fingerprint = public_fingerprint(key)
    who = known_sites(layout).get(fingerprint, "a key this federation does not know")
    hint = (
        "it was revoked (`flowerbed certs revoke`)" if who.endswith("revoked")
        else "`flowerbed sites add NAME` makes a key for a new site" if who.startswith("a key")
        else "restart `flowerbed superlink start` to register it"
    )  # fmt: skip
    return f"the SuperLink refused node key {fingerprint} ({who}): it is not registered; {hint}"


@dataclass
class RefusalWatch:
    """Reads the SuperLink's log from where it ends now, and reports refused keys."""

    layout: FederationLayout
    log_path: Path
    offset: int = -1
    said: dict[bytes, float] = field(default_factory=dict)

    def tick(self) -> list[str]:
        """The lines to show for keys refused since the last tick."""
        try:
            size = self.log_path.stat().st_size
        except OSError:
            return []
        if self.offset < 0 or size < self.offset:  # first look, or the log was started anew
            self.offset = size if self.offset < 0 else 0
            return []
        with self.log_path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        self.offset = size
        lines = []
        now = time.monotonic()
        for pem in refused_keys(chunk.decode("utf-8", errors="replace")):
            if now - self.said.get(pem, -REPEAT_S) >= REPEAT_S:
                self.said[pem] = now
                try:
                    lines.append(describe(self.layout, pem))
                except ValueError:
                    continue
        return lines
