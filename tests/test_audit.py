"""The hash-chained audit trail: concurrent appends stay one chain, and `flowerbed audit verify` names
the line that was edited, removed or reordered (the trail of a real run: tests/test_privacy.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed import audit
from flowerbed.errors import ExitCode
from tests.conftest import assert_clean_error, run_cli

WRITER = """
import sys
from pathlib import Path
from flowerbed import audit
for i in range(int(sys.argv[3])):
    audit.append(Path(sys.argv[1]), audit.ROUND, sys.argv[2], round=i, update_sha256="ab" * 32)
"""


def chain_of(tmp_path: Path, writers: int = 4, each: int = 25) -> Path:
    """``writers`` processes appending at once, as the supervisor, tasks and the CLI of a site do."""
    path = tmp_path / "fed" / "audit.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"writer-{i}", str(each)]) for i in range(writers)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    return path


@pytest.mark.federation
def test_concurrent_appends_make_one_intact_chain(tmp_path: Path) -> None:
    path = chain_of(tmp_path)
    verdict = audit.verify(path)
    assert verdict.intact and verdict.lines == 100, verdict.describe()
    events = audit.read(path)
    assert [e["seq"] for e in events] == list(range(1, 101))
    assert {e["actor"] for e in events} == {f"writer-{i}" for i in range(4)}
    shown = run_cli("audit", "verify", "-d", str(path.parent))
    assert shown.returncode == 0, shown.stderr
    assert "100 event(s), the chain is intact; head: event 100" in " ".join(shown.stdout.split())


def tampered(path: Path, change: str) -> Path:
    lines = path.read_text().splitlines(keepends=True)
    if change == "edit":
        record = json.loads(lines[41])
        record["details"]["update_sha256"] = "cd" * 32
        lines[41] = json.dumps(record, sort_keys=True) + "\n"
    elif change == "remove":
        del lines[41]
    elif change == "reorder":
        lines[41], lines[42] = lines[42], lines[41]
    elif change == "rehash":  # an edit whose own hash was recomputed: the next line's link breaks
        record = json.loads(lines[41])
        record["details"]["update_sha256"] = "cd" * 32
        record["hash"] = audit._digest(record)
        lines[41] = json.dumps(record, sort_keys=True) + "\n"
    path.write_text("".join(lines))
    return path


@pytest.mark.federation
def test_verify_names_an_edited_removed_or_reordered_line(tmp_path: Path) -> None:
    expected = {
        "edit": "line 42: event 42 was edited: its content no longer matches its hash",
        "remove": "line 42: event 43 where event 42 belongs: event(s) 42-42 were removed",
        "reorder": "line 42: event 43 where event 42 belongs (that one is on line 43): reordered",
        "rehash": "line 43: event 43 does not follow the event before it (chain broken)",
    }
    for change, needle in expected.items():
        path = tampered(chain_of(tmp_path / change, writers=2, each=30), change)
        assert needle in audit.verify(path).describe(), change
        result = run_cli("audit", "verify", "-d", str(path.parent))
        assert_clean_error(result, ExitCode.ERROR, needle, "keep this file as evidence")


@pytest.mark.federation
def test_show_prints_a_timeline_and_a_missing_trail_is_named(tmp_path: Path) -> None:
    path = chain_of(tmp_path, writers=1, each=3)
    shown = run_cli("audit", "show", "-d", str(path.parent), "--last", "2", env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "round 1" in shown.stdout and "round 2" in shown.stdout and "round 0," not in shown.stdout
    assert "writer-0" in shown.stdout
    assert_clean_error(run_cli("audit", "show", "-d", str(tmp_path / "none")), ExitCode.ERROR,
                       "audit.jsonl does not exist: no audit trail was written there yet")  # fmt: skip


def test_an_anchored_log_span_that_changes_is_found(tmp_path: Path) -> None:
    chain, log = tmp_path / "audit.jsonl", tmp_path / "gateway-access.log"
    log.write_text('10.0.0.1 - - [x] "POST /v1/fleet/pull-messages HTTP/1.1" 200\n' * 3)
    first = audit.anchor_log(chain, log, "coordinator")
    assert first is not None and first["details"]["clients"] == {"10.0.0.1": 3}
    assert audit.anchor_log(chain, log, "coordinator") is None  # nothing new
    with log.open("a") as handle:
        handle.write('10.0.0.2 - - [y] "POST /v1/fleet/push-messages HTTP/1.1" 200\n')
    second = audit.anchor_log(chain, log, "coordinator")
    assert second is not None and (second["details"]["from_line"], second["details"]["to_line"]) == (4, 4)
    assert audit.check_anchors(chain) == []
    log.write_text(log.read_text().replace("10.0.0.1", "10.0.0.9", 1))
    assert audit.check_anchors(chain) == [f"{log}: lines 1-3 were changed after event 1 anchored them"]
