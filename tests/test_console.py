"""`flowerbed run` without a terminal (piped to a file, as under nohup or a scheduler).

One plain line per round appears while the run goes on, not only at the end, and the final table
is printed whole (no column cut to 80 characters).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed.runfolder import read_rows
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for


@pytest.mark.federation
def test_a_piped_run_prints_each_round_as_it_ends_and_the_table_whole(
    running: RunningFederation, tmp_path: Path
) -> None:
    layout = running.layout
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # no terminal, no width
    with supervised_sites(layout, running.gateway, {s: running.data.site_files[s] for s in SITES[:2]},
                          tmp_path / "work"):  # fmt: skip
        with log.open("w") as handle:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "flowerbed"), "run", "-d", str(layout.root),
                                     "--name", "piped", "--max-rounds", "3", "--min-nodes", "2", "--patience", "10"],
                                    stdout=handle, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            out_dir = layout.runs / "piped"
            assert wait_for(lambda: any(r.get("kind") == "train" for r in read_rows(out_dir)), 300)
            # Round 1's line is in the file while the run goes on (within a poll or two).
            assert wait_for(lambda: "round 1: 2 node(s), 0 failure(s)" in log.read_text(), 10), log.read_text()
            assert proc.poll() is None or "round 3:" not in log.read_text().split("round 1:")[0]
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    text = log.read_text()
    assert proc.returncode == 0, text
    for n in (1, 2, 3):
        assert f"round {n}: 2 node(s)" in text, text
    assert "…" not in text and "max-rounds" in text and "missing" in text  # the table whole, every column named
    assert "\x1b[" not in text  # no terminal escapes in a file
