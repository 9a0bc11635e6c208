"""Convergence criteria: target, plateau with patience and min-delta, max rounds, time budget."""

from __future__ import annotations

from flowerbed.config import RunSettings
from flowerbed.serverapp.criteria import MAX_ROUNDS, PLATEAU, TARGET, TIME_BUDGET, ConvergenceTracker


def settings(**kw: object) -> RunSettings:
    return RunSettings.model_validate({"patience": 2, "min_delta": 0.01, **kw})


def test_target_accuracy_stops() -> None:
    tracker = ConvergenceTracker(settings(target_value=0.9))
    assert tracker.observe(1, 0.5, 0.8) is None
    assert tracker.observe(2, 0.4, 0.9) == TARGET
    assert tracker.best_round == 2


def test_target_loss_stops() -> None:
    tracker = ConvergenceTracker(settings(target_metric="loss", target_value=0.2))
    assert tracker.observe(1, 0.3, 0.5) is None
    assert tracker.observe(2, 0.19, 0.5) == TARGET


def test_plateau_counts_only_improvements_above_min_delta() -> None:
    tracker = ConvergenceTracker(settings())
    assert tracker.observe(1, 1.0, 0.5) is None
    assert tracker.observe(2, 0.995, 0.5) is None  # 0.005 < min_delta: no improvement
    assert tracker.observe(3, 0.5, 0.6) is None  # improvement resets patience
    assert tracker.observe(4, 0.6, 0.6) is None
    assert tracker.observe(5, 0.499, 0.6) == PLATEAU
    assert tracker.best_round == 3
    assert tracker.best_loss == 0.5


def test_limits() -> None:
    s = settings(max_rounds=5, time_budget_s=10)
    assert ConvergenceTracker.limit(4, 1.0, s) is None
    assert ConvergenceTracker.limit(5, 1.0, s) == MAX_ROUNDS
    assert ConvergenceTracker.limit(2, 10.0, s) == TIME_BUDGET
