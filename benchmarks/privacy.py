"""Privacy benchmark: what DP-SGD at a site costs in accuracy, and whether the accountants agree.

1. Pooled digits (scikit-learn's 8x8 digits, 75/25 split), the kit's MLP, 20 epochs, delta 1e-5:
   accuracy without DP and with DP-SGD (the kit's own training path, Opacus, noise calibrated to
   the budget) at epsilon 8, 3 and 1; the mean of ``--seeds`` seeds.
2. Accountants: epsilon for 250 patients, batch 16, 300 steps, noise 1.0 by Opacus RDP and PRV and
   by Google's dp-accounting (RDP and PLD), which the kit does not use: an independent check.

Prints both tables, writes docs/benchmarks/privacy.json and .png.

    python -m benchmarks.privacy [--seeds 3] [--epochs 20] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, show, write

EPSILONS: list[float | None] = [None, 8.0, 3.0, 1.0]
DELTA = 1e-5


def digits(seed: int) -> tuple[Any, Any]:
    """Train and test sets of the digits that ship inside scikit-learn (nothing is downloaded)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.int64)
    cut = round(len(y) * 0.75)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def accuracy(epsilon: float | None, seed: int, epochs: int, folder: Path) -> tuple[float, float, float]:
    """Test accuracy, the epsilon the ledger counted and the seconds, for one training run."""
    import torch

    from flowerbed.clientapp.privacy import Budget, PrivateTraining
    from flowerbed.clientapp.task import evaluate, make_model, train

    torch.manual_seed(seed)
    train_set, test_set = digits(seed)
    model = make_model("mlp", num_features=64, num_classes=10, hidden_units=64, image_size=8)
    private = None
    if epsilon is not None:
        budget = Budget(epsilon=epsilon, delta=DELTA, max_grad_norm=1.0, noise_multiplier=None)
        private = PrivateTraining("bench", budget, folder, f"eps-{epsilon}-seed-{seed}", 0, 1, 1)
    start = time.monotonic()
    train(model, train_set, epochs=epochs, batch_size=64, learning_rate=0.005, seed=seed, private=private)
    seconds = time.monotonic() - start
    spent = private.spent if private is not None and private.spent is not None else 0.0
    return evaluate(model, test_set).accuracy, spent, seconds


def accountants() -> list[list[Any]]:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    from flowerbed.clientapp.privacy import epsilon_spent

    rate, steps, noise = 16 / 250, 300, 1.0
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    rows: list[list[Any]] = [
        ["Opacus RDP (the kit's default)", epsilon_spent([(noise, rate, steps)], DELTA, "rdp")],
        ["Opacus PRV", epsilon_spent([(noise, rate, steps)], DELTA, "prv")],
    ]
    for name, counter in (("dp-accounting RDP", RdpAccountant()), ("dp-accounting PLD", PLDAccountant())):
        counter.compose(event, steps)
        rows.append([name, float(counter.get_epsilon(DELTA))])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds, epochs = (1, 2) if args.smoke else (args.seeds, args.epochs)
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-privacy-") as tmp:
        for epsilon in EPSILONS:
            runs = [accuracy(epsilon, seed, epochs, Path(tmp)) for seed in range(seeds)]
            label = "no DP" if epsilon is None else f"epsilon {epsilon:g}"
            rows.append([label, statistics.mean(r[0] for r in runs), min(r[0] for r in runs),
                         statistics.mean(r[1] for r in runs), statistics.mean(r[2] for r in runs)])  # fmt: skip
    show(f"Pooled digits, MLP, {epochs} epochs, delta {DELTA:g}, {seeds} seed(s)",
         ["setting", "accuracy (mean)", "accuracy (min)", "epsilon counted", "train s"], rows)  # fmt: skip
    agree = accountants()
    show("250 patients, batch 16, 300 steps, noise 1.0, delta 1e-5", ["accountant", "epsilon"], agree)

    def plot(ax: Any) -> None:
        ax.bar([str(r[0]) for r in rows], [100 * r[1] for r in rows], color="#4c72b0")
        ax.set_ylabel("test accuracy, %")
        ax.set_ylim(0, 100)
        ax.set_title(f"DP-SGD on pooled digits ({epochs} epochs, delta {DELTA:g})")

    result = {
        "seeds": seeds, "epochs": epochs, "delta": DELTA, "smoke": args.smoke,
        "rows": [{"setting": r[0], "accuracy": r[1], "accuracy_min": r[2], "epsilon": r[3], "train_s": r[4]}
                 for r in rows],
        "accountants": [{"accountant": r[0], "epsilon": r[1]} for r in agree],
    }  # fmt: skip
    write("privacy", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
