"""The point a run resumes from, read from its run folder (:mod:`flowerbed.runfolder`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flowerbed.errors import FlowerbedError
from flowerbed.runfolder import (
    BEST,
    FINAL_EVAL,
    RESUMED,
    TRAIN,
    RoundRow,
    checkpoint_path,
    ended,
    read_rows,
    row_from_dict,
)

if TYPE_CHECKING:
    import torch

RESUME_KEY = "resume"  # run-config key: go on from the folder's last checkpoint


@dataclass
class ResumePoint:
    """What a resumed ServerApp starts from."""

    round: int  # the last round whose model was checkpointed (0: the initial model)
    rows: list[RoundRow]  # the history as written, kept whole
    state_dict: dict[str, torch.Tensor] | None  # the model aggregated in ``round`` (None: initial)
    best_round: int | None = None
    best_state_dict: dict[str, torch.Tensor] | None = None
    elapsed_s: float = 0.0  # time already spent in rounds (counts against the time budget)
    trained: list[RoundRow] = field(default_factory=list)  # the train rows up to ``round``


def plan_resume(out_dir: Path) -> int:
    """The last round of ``out_dir`` that has both its history row and its checkpoint (0: none ended).

    A checkpoint written just before a crash, whose row never was, is removed: that round is
    trained again. Raises :class:`FlowerbedError` when the folder cannot be resumed. Reads no model.
    """
    summary = ended(out_dir)
    if summary is not None and summary.get("status") == "completed":
        raise FlowerbedError(
            f"run {out_dir.name} completed ({summary.get('stop_reason')}); start a new run instead of resuming it"
        )
    rows = [row_from_dict(r) for r in read_rows(out_dir)]
    if any(r.kind == FINAL_EVAL for r in rows):
        raise FlowerbedError(f"run {out_dir.name} already trained its last round; start a new run instead")
    trained = [r.round for r in rows if r.kind == TRAIN]
    resume_round = next((n for n in reversed(trained) if checkpoint_path(out_dir, n).exists()), 0)
    if trained and resume_round == 0:
        raise FlowerbedError(
            f"run {out_dir.name} has no round checkpoint left to resume from (keep_checkpoints = 0?); start a new run"
        )
    for orphan in (out_dir / "checkpoints").glob("round-*.pt"):
        if int(orphan.stem.split("-")[1]) > resume_round:
            orphan.unlink()
    return resume_round


def load_resume_point(out_dir: Path) -> ResumePoint:
    """The models and history a resumed ServerApp goes on with (see :func:`plan_resume`)."""
    import torch

    resume_round = plan_resume(out_dir)
    rows = [row_from_dict(r) for r in read_rows(out_dir)]
    state = torch.load(checkpoint_path(out_dir, resume_round), weights_only=True) if resume_round else None
    best_round, best_state = None, None
    best_path = out_dir / "checkpoints" / BEST
    if best_path.exists():
        best = torch.load(best_path, weights_only=True)
        if int(best["round"]) <= resume_round:
            best_round, best_state = int(best["round"]), best["state_dict"]
    return ResumePoint(
        round=resume_round,
        rows=rows,
        state_dict=state,
        best_round=best_round,
        best_state_dict=best_state,
        elapsed_s=sum(r.seconds for r in rows if r.kind != RESUMED),
        trained=[r for r in rows if r.kind == TRAIN and r.round <= resume_round],
    )


def resume_row(point: ResumePoint, run_id: int, why: str) -> RoundRow:
    """The history row that notes a resume."""
    after = f"round {point.round}'s checkpoint" if point.round else "the start (no round had ended)"
    return RoundRow(
        round=point.round, nodes=0, failures=0, train_loss=None, eval_loss=None, eval_accuracy=None,
        seconds=0.0, stop_reason=f"resumed from {after} as Flower run {run_id}{why}", kind=RESUMED,
    )  # fmt: skip
