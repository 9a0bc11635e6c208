"""Where a run folder resumes from, read from real history and checkpoint files (no Flower needed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from flowerbed.errors import FlowerbedError
from flowerbed.runfolder import FAILED, RESUMING_FILE, TRAIN, WAITING, History, RoundRow
from flowerbed.runner import resume_lock
from flowerbed.serverapp.resume import load_resume_point, plan_resume, resume_row


def row(n: int, kind: str = TRAIN, loss: float | None = 0.5, seconds: float = 10.0) -> RoundRow:
    return RoundRow(n, 2, 0, 0.4, loss, 0.8 if loss is not None else None, seconds, kind=kind, sites=["a", "b"])


def folder(tmp_path: Path, rounds: int, keep: int = 3, extra: list[RoundRow] | None = None) -> Path:
    history = History(tmp_path / "run")
    for n in range(1, rounds + 1):
        history.checkpoint(n, {"w": torch.full((2,), float(n))}, keep=keep)
        history.append(row(n, loss=1.0 / n))
    for extra_row in extra or []:
        history.append(extra_row)
    return history.out_dir


def test_a_failed_run_resumes_from_its_last_round_with_its_history_whole(tmp_path: Path) -> None:
    out = folder(tmp_path, 4, extra=[row(5, WAITING, None, 60.0), row(5, FAILED, None, 0.1)])
    History(out).save_best(3, {"w": torch.full((2,), 2.0)})
    point = load_resume_point(out)
    assert point.round == 4 and torch.equal(point.state_dict["w"], torch.full((2,), 4.0))  # type: ignore[index]
    assert [r.round for r in point.trained] == [1, 2, 3, 4] and len(point.rows) == 6
    assert point.best_round == 3 and point.best_state_dict is not None
    assert point.elapsed_s == pytest.approx(4 * 10.0 + 60.0 + 0.1)  # time in rounds counts against the budget
    assert "round 4's checkpoint" in resume_row(point, 7, "; by hand").stop_reason


def test_a_checkpoint_without_its_row_is_trained_again(tmp_path: Path) -> None:
    out = folder(tmp_path, 3)
    History(out).checkpoint(4, {"w": torch.zeros(2)})  # the crash came between checkpoint and row
    assert plan_resume(out) == 3
    assert not (out / "checkpoints" / "round-0004.pt").exists()


def test_what_cannot_be_resumed_says_so(tmp_path: Path) -> None:
    done = folder(tmp_path / "done", 2)
    (done / "summary.json").write_text(json.dumps({"status": "completed", "stop_reason": "max-rounds"}))
    with pytest.raises(FlowerbedError, match="completed \\(max-rounds\\); start a new run"):
        plan_resume(done)
    bare = folder(tmp_path / "bare", 2, keep=0)
    with pytest.raises(FlowerbedError, match="no round checkpoint left to resume from"):
        plan_resume(bare)
    fresh = folder(tmp_path / "fresh", 0)  # interrupted before any round ended: from the start
    assert plan_resume(fresh) == 0 and load_resume_point(fresh).state_dict is None


def test_one_resume_at_a_time(tmp_path: Path) -> None:
    out = folder(tmp_path, 1)
    with resume_lock(out):
        assert (out / RESUMING_FILE).exists()
        with pytest.raises(FlowerbedError, match="is being resumed already"), resume_lock(out):
            pass
    assert not (out / RESUMING_FILE).exists()
    (out / RESUMING_FILE).write_text("")
    old = time.time() - 3600
    os.utime(out / RESUMING_FILE, (old, old))  # left by a resume that was killed: taken over
    with resume_lock(out):
        pass


def test_a_run_that_met_its_criteria_before_a_crash_trains_no_round_more(tmp_path: Path) -> None:
    """Killed between its last round's row and the final evaluation: resumed, it goes to the final evaluation
    (it trained a round past max_rounds before); resumed with a higher max_rounds, it trains on."""
    from flowerbed.config import RunSettings
    from flowerbed.serverapp.loop import already_stopped, start_rounds

    out = folder(tmp_path, 4)
    point = load_resume_point(out)
    for max_rounds, expected in ((4, "max-rounds"), (6, None)):
        settings = RunSettings.model_validate({"max_rounds": max_rounds, "patience": 50})
        state = start_rounds(ArrayRecord({"w": torch.zeros(2)}), settings, History(out, point.rows), 0.0, resume=point,
                             watch=None)  # fmt: skip
        assert already_stopped(state, point, 0.0) == expected
    assert already_stopped(state, None, 0.0) is None
