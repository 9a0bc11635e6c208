"""A full disk loses nothing, and torn files are mended on resume.

The full disk is real: a small tmpfs mounted over the federation's runs/ folder (the test runs as
root, as CI does), filled until the next checkpoint cannot fit. The torn files are a real run's
history with a garbled last line, as a kill -9 mid-write leaves it, then resumed by hand.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from tests.conftest import (
    SITES,
    RunningFederation,
    coordinator,
    make_config,
    make_federation,
    run_cli,
    supervised_sites,
)
from tests.faults import record

MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _check_run_folder(out_dir: Path) -> None:
    """No zero-byte or half-written file: every history line parses, no temporary file is left."""
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert path.stat().st_size > 0 or path.name.startswith("."), f"zero bytes: {path}"
            assert not path.name.endswith(".tmp"), f"left behind: {path}"
    for line in (out_dir / "history.jsonl").read_text().splitlines():
        json.loads(line)
    rows = list(csv.reader((out_dir / "history.csv").open(newline="")))
    assert all(len(r) == len(rows[0]) for r in rows) and b"\r\n" not in (out_dir / "history.csv").read_bytes()


def test_a_checkpoint_is_written_straight_to_disk_and_a_full_disk_mid_write_is_named(small_disk: Path) -> None:
    """torch.save writes to the temporary file (a model is not serialized into memory first), the space it
    needs is estimated from its tensors before it starts, and a disk that fills during the write is a
    DiskFullError with no temporary file left, though torch.save wraps the ENOSPC in a RuntimeError."""
    import torch

    from flowerbed.diskspace import DiskFullError, write_atomic_with
    from flowerbed.runfolder import SAVE_OVERHEAD, _save, _tensor_bytes

    state = {f"layer{i}.weight": torch.zeros(3, 5) for i in range(300)} | {"big": torch.ones(2**20)}  # 4 MB
    path = small_disk / "round-0001.pt"
    _save(state, path)
    assert path.stat().st_size <= _tensor_bytes(state) + SAVE_OVERHEAD  # the estimate covers what is written
    assert torch.equal(torch.load(path, weights_only=True)["big"], state["big"])
    with pytest.raises(DiskFullError, match=r"no space left on tmpfs at .* the next write needs 16\.0 MB"):
        write_atomic_with(small_disk / "big.pt", lambda h: torch.save({"w": torch.ones(4 * 2**20)}, h), 16 * MB)
    assert sorted(p.name for p in small_disk.iterdir()) == ["round-0001.pt"]  # nothing half-written is left


@pytest.mark.federation
def test_a_full_disk_ends_the_run_said_why_and_resume_goes_on(tmp_path: Path, small_disk: Path) -> None:
    config = make_config("disk", SITES[:2], min_nodes=2, max_rounds=4, patience=10, hidden_units=8192)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    layout.runs.symlink_to(small_disk)  # runs/ lives on the small disk
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # leave about 3 MB: one 1 MB checkpoint fits, the second does not
        handle.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 3 * MB))
    with coordinator(layout, config) as stack:
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {s: data.site_files[s] for s in SITES[:2]},
                              tmp_path / "work"):  # fmt: skip
            full = run_cli("run", "-d", str(layout.root), "--name", "full", timeout=600)
            assert all(proc.poll() is None for proc in stack.processes)  # the coordinator goes on
            status = run_cli("runs", "-d", str(layout.root))
            summary = json.loads((layout.runs / "full" / "summary.json").read_text())
            _check_run_folder(layout.runs / "full")
            filler.unlink()  # space is freed ...
            resumed = run_cli("run", "-d", str(layout.root), "--resume", "full", timeout=600)  # ... and it goes on
    text = " ".join((full.stdout + full.stderr).split())
    assert full.returncode == ExitCode.RUN_FAILED and "Traceback" not in text, text
    assert "MB free on tmpfs at" in text and "this run's checkpoints need about" in text  # warned before it began
    assert f"no space left on tmpfs at {small_disk}" in text and "MB free, the next write needs" in text, text
    out_dir = layout.runs / "full"
    assert summary["status"] == "failed" and summary["stop_reason"].startswith("no space left on tmpfs"), summary
    assert "full" in status.stdout and "failed" in status.stdout
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _check_run_folder(out_dir)
    rows = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    record("a full disk under runs/", "the run ended: no space left on DEVICE (path), MB free and needed; "
           "`run --resume` went on after space was freed", injected="runs/ on a 12 MB tmpfs filled to 3 MB free",
           rounds_lost=0, replies_lost=0)  # fmt: skip


@pytest.mark.federation
def test_a_torn_history_line_is_cut_off_and_kept_aside_on_resume(running: RunningFederation, tmp_path: Path) -> None:
    layout = running.layout
    data = {s: running.data.site_files[s] for s in SITES[:2]}
    with supervised_sites(layout, running.gateway, data, tmp_path / "work"):
        first = run_cli("run", "-d", str(layout.root), "--name", "torn", "--max-rounds", "2", "--min-nodes", "2",
                        "--patience", "10", timeout=600)  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        out_dir = layout.runs / "torn"
        (out_dir / "summary.json").unlink()  # as if the coordinator was killed after round 2 ...
        for name in ("history.jsonl", "history.csv"):  # ... while it wrote the next line
            lines = (out_dir / name).read_text().splitlines(keepends=True)
            (out_dir / name).write_text("".join(line for line in lines if "final-eval" not in line))
            with (out_dir / name).open("ab") as handle:
                handle.write(b'{"round": 3, "kind": "train", "nodes": 9.1824\0\0garbage')
        before = run_cli("runs", "-d", str(layout.root))
        resumed = run_cli("run", "-d", str(layout.root), "--resume", "torn", "--max-rounds", "4", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _check_run_folder(out_dir)
    for name in ("history.jsonl", "history.csv"):
        assert b"garbage" in (out_dir / f"{name}.torn").read_bytes()
        assert b"garbage" not in (out_dir / name).read_bytes()
    rows = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    listed = run_cli("runs", "-d", str(layout.root)).stdout
    cells = next(
        c for c in ([x.strip() for x in line.split("│")] for line in listed.splitlines()) if c[1:2] == ["torn"]
    )
    assert cells[3:6] == ["completed", "4", "1"], (listed, before.stdout)  # status, rounds, resumes
    record("a torn history line (killed mid-write)", "on resume the line was cut off into NAME.torn; the "
           "files parse, `flowerbed runs` counts right", injected="garbage without a newline after round 2",
           rounds_lost=0, replies_lost=0)  # fmt: skip
