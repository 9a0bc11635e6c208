"""The tamper-evident audit trail: an append-only, hash-chained JSON-lines file.

One file on the coordinator (``FED/audit.jsonl``) and one at each site (``WORKDIR/audit.jsonl``).
Each line is one event with its sequence number, UTC time, actor, kind and details, the hash of the
line before it and its own hash (sha256 over the canonical JSON of everything else). Editing a line
breaks its own hash; removing or reordering lines breaks the sequence and the chain; a line added
in the middle breaks the next line's link. :func:`verify` names the first line that is wrong and why.

Appends from several processes (the supervisor, each task, the CLI) take an exclusive lock on the
file, read the last line and write the next one, so the chain stays a chain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flowerbed.errors import FlowerbedError

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
AUDIT_ENV = "FLOWERBED_AUDIT_LOG"  # where a process the kit started appends (set by its starter)
GATEWAY_LOG_ENV = "FLOWERBED_GATEWAY_LOG"  # the coordinator's gateway access log, anchored at each run's end

# Event kinds (``flowerbed audit show`` groups by them).
CONNECTED = "connected"  # a SuperNode connected (site), or a node was seen by the SuperLink
TASK = "task"  # a task or app ran here: its name and hash, approved or refused
ROUND = "round"  # a round: who took part (coordinator) / what left this site (site)
CERT = "certificate"  # CA, server certificate, node key issued, registered, revoked
APPROVAL = "approval"  # a site's data steward approved or revoked a task or app
RUN = "run"  # a run was submitted, resumed or ended
GATEWAY = "gateway"  # a span of the gateway's access log, anchored by its sha256


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: msvcrt locks a byte range
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
        yield handle


TAIL_BLOCK = 64 * 1024


def _last_line(handle: IO[bytes]) -> str | None:
    """The last non-empty line, read from the end (a trail of a year's rounds is not read whole)."""
    end = handle.seek(0, os.SEEK_END)
    tail, start = b"", end
    while start > 0:
        start = max(0, start - TAIL_BLOCK)
        handle.seek(start)
        tail = handle.read(end - start)
        lines = [line for line in tail.splitlines() if line.strip()]
        # A complete last line: more than one line in the block, or the block reaches the file's start.
        if len(lines) > 1 or (lines and start == 0):
            return lines[-1].decode("utf-8", errors="replace")
    return None


def append(path: Path, kind: str, actor: str, /, **details: Any) -> dict[str, Any]:
    """Add one event to the chain at ``path`` (created on first use); returns the record written."""
    with _locked(path) as handle:
        last = _last_line(handle)
        if last is None:
            seq, prev = 1, GENESIS
        else:
            try:
                before = json.loads(last)
                seq, prev = int(before["seq"]) + 1, str(before["hash"])
            except (ValueError, KeyError, TypeError):
                raise FlowerbedError(
                    f"{path}: its last line is damaged, so nothing can be chained to it: "
                    f"run `flowerbed audit verify` and keep the file as evidence"
                ) from None
        record: dict[str, Any] = {
            "seq": seq,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "kind": kind,
            "actor": actor,
            "details": details,
            "prev": prev,
        }
        record["hash"] = _digest(record)
        handle.seek(0, os.SEEK_END)
        handle.write((json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
    return record


def append_here(kind: str, actor: str, /, **details: Any) -> dict[str, Any] | None:
    """Append to the log named by ``FLOWERBED_AUDIT_LOG`` (a process the kit started), if any."""
    target = os.environ.get(AUDIT_ENV)
    return append(Path(target), kind, actor, **details) if target else None


def anchor_here(actor: str) -> None:
    """Anchor the gateway access log named by ``FLOWERBED_GATEWAY_LOG`` into this process's trail."""
    target, log_file = os.environ.get(AUDIT_ENV), os.environ.get(GATEWAY_LOG_ENV)
    if target and log_file:
        anchor_log(Path(target), Path(log_file), actor)


def head_of(record: dict[str, Any] | None) -> str:
    """``SEQ:HASH`` of a record: a site's reply carries its chain's head, which the coordinator logs."""
    return f"{record['seq']}:{record['hash']}" if record else ""


@dataclass(frozen=True)
class Problem:
    """The first place where the chain is broken."""

    line: int  # 1-based line number in the file
    reason: str


@dataclass(frozen=True)
class Verdict:
    """What checking an audit trail found: lines read and the first problem, if any."""

    path: Path
    lines: int
    problem: Problem | None

    @property
    def intact(self) -> bool:
        """True when every line checked out."""
        return self.problem is None

    def describe(self) -> str:
        """The verdict in one line."""
        if self.problem is None:
            return f"{self.path}: {self.lines} event(s), the chain is intact"
        return f"{self.path}: line {self.problem.line}: {self.problem.reason}"


def read(path: Path) -> list[dict[str, Any]]:
    """The events of a log (lines that are not JSON are skipped; :func:`verify` names them)."""
    from flowerbed.runfolder import read_jsonl

    return read_jsonl(path, stop_at_bad=False)


def verify(path: Path) -> Verdict:
    """Check every line: its own hash, its sequence number and its link to the line before it."""
    if not path.exists():
        raise FlowerbedError(f"{path} does not exist: no audit trail was written there yet")
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            return Verdict(path, len(records), Problem(number, "an empty line: a line was cut out or blanked"))
        try:
            record = json.loads(line)
            int(record["seq"]), str(record["prev"]), str(record["hash"])
        except (ValueError, KeyError, TypeError):
            return Verdict(path, len(records), Problem(number, "not an audit record (damaged or inserted by hand)"))
        records.append((number, record))
    line_of = {int(r["seq"]): n for n, r in records}
    prev, count = GENESIS, 0
    for expected, (number, record) in enumerate(records, start=1):
        seq = int(record["seq"])
        if _digest(record) != record["hash"]:
            return Verdict(
                path, count, Problem(number, f"event {seq} was edited: its content no longer matches its hash")
            )
        if seq != expected:
            if expected in line_of:
                why = f"event {seq} where event {expected} belongs (that one is on line {line_of[expected]}): reordered"
            elif seq > expected:
                why = f"event {seq} where event {expected} belongs: event(s) {expected}-{seq - 1} were removed"
            else:
                why = f"event {seq} again where event {expected} belongs: a repeated or inserted line"
            return Verdict(path, count, Problem(number, why))
        if record["prev"] != prev:
            return Verdict(
                path, count, Problem(number, f"event {seq} does not follow the event before it (chain broken)")
            )
        prev, count = str(record["hash"]), count + 1
    return Verdict(path, count, None)


def summary(event: dict[str, Any]) -> str:
    """One readable line of an event's details."""
    details = event.get("details", {})
    return ", ".join(f"{k} {v}" for k, v in details.items() if v not in (None, "", [], {}))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def anchor_log(chain: Path, log_file: Path, actor: str) -> dict[str, Any] | None:
    """Anchor the lines ``log_file`` gained since its last anchor (e.g. the gateway's access log).

    The event holds the span, its sha256 and, for an access log, requests per client address; a
    later edit of those lines is found by :func:`check_anchors`. None when nothing new was written.
    """
    start = 0
    for event in read(chain):
        details = event.get("details", {})
        if event.get("kind") == GATEWAY and details.get("file") == str(log_file):
            start = max(start, int(details.get("to_line", 0)))
    lines = _lines(log_file)
    if len(lines) <= start:
        return None
    span = lines[start:]
    clients: dict[str, int] = {}
    for line in span:
        address = line.split(b" ", 1)[0].decode(errors="replace")
        clients[address] = clients.get(address, 0) + 1
    return append(chain, GATEWAY, actor, file=str(log_file), from_line=start + 1, to_line=len(lines),
                  sha256=hashlib.sha256(b"".join(span)).hexdigest(), requests=len(span),
                  clients=clients)  # fmt: skip


def check_anchors(chain: Path) -> list[str]:
    """Each anchored log span that no longer hashes to what was anchored, as one line each."""
    problems = []
    for event in read(chain):
        details = event.get("details", {})
        if event.get("kind") != GATEWAY:
            continue
        log_file = Path(str(details.get("file")))
        lines = _lines(log_file)
        first, last = int(details["from_line"]), int(details["to_line"])
        if len(lines) < last:
            problems.append(
                f"{log_file}: lines {first}-{last} anchored by event {event['seq']} are no longer all there"
            )
        elif hashlib.sha256(b"".join(lines[first - 1 : last])).hexdigest() != details.get("sha256"):
            problems.append(f"{log_file}: lines {first}-{last} were changed after event {event['seq']} anchored them")
    return problems
