"""Convergence criteria, as plain state over per-round eval results (no Flower here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flowerbed.config import RunSettings

TARGET = "target-reached"
PLATEAU = "plateau"
MAX_ROUNDS = "max-rounds"
TIME_BUDGET = "time-budget"
STOP_ASKED = "stopped-by-coordinator"  # `flowerbed runs stop`: ended after a round, with its final evaluation
PRIVACY_SPENT = "privacy-budgets-spent"  # too few sites may train any more under their privacy budgets


@dataclass
class ConvergenceTracker:
    """Decides after each round whether to stop, and remembers the best evaluated round."""

    settings: RunSettings
    best_loss: float = math.inf
    best_round: int | None = None
    rounds_without_improvement: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)

    def observe(
        self, server_round: int, eval_loss: float, eval_accuracy: float | None, metrics: dict[str, float] | None = None
    ) -> str | None:
        """Record the eval result of the model sent in ``server_round``; a stop reason or None.

        Plateau and the best round follow the eval loss; the target can be any reported metric
        (``metrics`` holds them all by name), reached when at or beyond ``target_value`` in the
        metric's direction (``target_mode``).
        """
        self.history.append((server_round, eval_loss, eval_accuracy if eval_accuracy is not None else math.nan))
        if eval_loss < self.best_loss - self.settings.min_delta:
            self.best_loss = eval_loss
            self.best_round = server_round
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
            if self.best_round is None:
                self.best_round = server_round
        target = self.settings.target_value
        values = {"loss": eval_loss, **({"accuracy": eval_accuracy} if eval_accuracy is not None else {})}
        value = (metrics or {}).get(self.settings.target_metric, values.get(self.settings.target_metric))
        reached = (
            value is not None
            and target is not None
            and math.isfinite(value)
            and (value >= target if self.settings.target_direction() == "max" else value <= target)
        )
        if reached:
            return TARGET
        if self.rounds_without_improvement >= self.settings.patience:
            return PLATEAU
        return None

    @staticmethod
    def limit(server_round: int, elapsed_s: float, settings: RunSettings) -> str | None:
        """MAX_ROUNDS after the last round, TIME_BUDGET once the wall-time budget is spent."""
        if server_round >= settings.max_rounds:
            return MAX_ROUNDS
        if elapsed_s >= settings.time_budget_s:
            return TIME_BUDGET
        return None
