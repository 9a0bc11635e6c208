"""Every metric a task reports, everywhere: history.csv, the plot, the notebook's DataFrame, the summary line;
the final evaluation is a row of its own kind, never a round.

Real files written by the run folder's own writer (the federated path is in tests/test_runs.py).
"""

from __future__ import annotations

import csv
import math
import struct
from pathlib import Path

from flowerbed.config import save_toml_model
from flowerbed.notebook import Federation
from flowerbed.runfolder import (
    APP_MANIFEST,
    FINAL_EVAL,
    HISTORY_CSV,
    History,
    RoundRow,
    best_evaluation,
    plot_history,
    repair,
)
from flowerbed.views import best_line
from tests.conftest import make_config


def _row(n: int, auroc: float, **extra: float) -> RoundRow:
    metrics = {"train-loss": 1.0 / n, "eval-loss": 0.9 / n, "eval-accuracy": 0.5 + n / 10, "eval-auroc": auroc}
    return RoundRow(n, 2, 0, 1.0 / n, 0.9 / n, 0.5 + n / 10, 1.0, metrics=metrics | extra)


def _final(n: int) -> RoundRow:
    return RoundRow(n + 1, 2, 0, None, 0.2, 0.9, 1.0, "evaluation of the last model", kind=FINAL_EVAL,
                    metrics={"eval-loss": 0.2, "eval-accuracy": 0.9, "eval-auroc": 0.95, "eval-ece": 0.04})  # fmt: skip


def test_history_csv_has_a_column_for_every_metric_and_the_final_evaluation_is_no_round(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(_row(1, 0.7))
    history.append(_row(2, 0.8))
    first = (tmp_path / HISTORY_CSV).read_text()
    history.append(_row(3, 0.85, **{"eval-balanced-accuracy": 0.8}))  # a metric first seen in round 3
    history.append(_final(3))
    with (tmp_path / HISTORY_CSV).open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert first.splitlines()[0].endswith("eval_auroc")  # the columns the first rows had, appended to
    assert [r["round"] for r in table] == ["1", "2", "3", ""] and table[-1]["kind"] == "final-eval"
    assert [r["eval_auroc"] for r in table] == ["0.7", "0.8", "0.85", "0.95"]
    assert [r["eval_balanced_accuracy"] for r in table] == ["", "", "0.8", ""]  # rewritten with the wider header
    assert table[-1]["eval_ece"] == "0.04"
    header = list(table[0])
    assert len(header) == len(set(header)) and "eval-loss" not in header  # each metric once, as a column name
    # A torn last line of the wide file is cut off as one of the narrow file was.
    with (tmp_path / HISTORY_CSV).open("a") as handle:
        handle.write("4,train,2,0,0.1")
    assert repair(tmp_path) and (tmp_path / HISTORY_CSV).read_text().endswith("0.04\n")


def test_the_plot_has_a_panel_per_metric(tmp_path: Path) -> None:
    rows = [_row(1, 0.7), _row(2, 0.8), _final(2)]
    plot_history(rows, tmp_path / "two.png")  # loss, accuracy, auroc, ece: 4 panels on 3 columns, 2 lines
    plot_history([RoundRow(1, 2, 0, 0.5, 0.4, None, 1.0)], tmp_path / "one.png")  # loss only: 1 panel

    def size(path: Path) -> tuple[int, int]:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        return width, height

    assert size(tmp_path / "two.png") == (1500, 800)
    assert size(tmp_path / "one.png") == (500, 400)


def test_the_summary_names_the_metric_that_drove_the_run() -> None:
    rows = [_row(1, 0.7), _row(2, 0.8), _final(2)]
    assert best_evaluation(rows, 2, 2) == ("round 2", {"loss": 0.45, "accuracy": 0.7, "auroc": 0.8})
    where, found = best_evaluation(rows, 3, 2)
    assert where == "the final evaluation (after round 2)" and found["ece"] == 0.04
    summary = {"stop_reason": "max-rounds", "rounds": 2, "best_round": 3, "best_model": where,
               "target_metric": "auroc", "best_target_value": 0.95, "best_eval_accuracy": 0.9}  # fmt: skip
    assert best_line(7, summary).endswith("best auroc 0.9500 (the final evaluation (after round 2))")


def test_the_notebook_history_has_each_metric_once(tmp_path: Path) -> None:
    save_toml_model(tmp_path / "federation.toml", make_config("nb"))
    out = tmp_path / "runs" / "r1"
    (out / APP_MANIFEST).parent.mkdir(parents=True)
    (out / APP_MANIFEST).write_text("")
    history = History(out)
    for row in (_row(1, 0.7), _row(2, 0.8), _final(2)):
        history.append(row)
    frame = Federation(tmp_path).get("r1").history
    columns = list(frame.columns)
    assert len(columns) == len(set(columns)) and "eval-loss" not in columns and "eval_auroc" in columns
    assert frame["round"].isna().tolist() == [False, False, True]  # the final evaluation is no round
    assert frame["eval_ece"].tolist()[-1] == 0.04


def _auroc(scores: list[float], labels: list[int]) -> float:
    """The AUROC of these predictions, exactly (Mann-Whitney U, ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_a_pooled_metric_is_the_metric_of_the_pooled_data_and_the_weighted_mean_is_not(tmp_path: Path) -> None:
    """The template task's pooled AUROC (score counts each site sends, summed at the coordinator) against
    the truth, the AUROC of both sites' predictions as one; the weighted mean of their AUROCs misses it."""
    import importlib
    import sys

    import torch
    from torch.utils.data import TensorDataset

    from flowerbed.serverapp.loop import pooled_metrics
    from flowerbed.task import pool_metrics, pools, site_statistics
    from flowerbed.taskpkg import new_task

    package = new_task(tmp_path, "pool-check")
    sys.path.insert(0, str(package))
    try:
        task = importlib.import_module("flowerbed_task_pool_check.task").task
    finally:
        sys.path.remove(str(package))
    assert pools(task)

    class Fixed(torch.nn.Module):  # a model whose scores are its input's first feature: known predictions
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.zeros(len(x)), x[:, 0]], dim=1)

    generator = torch.Generator().manual_seed(3)
    sites = []
    for shift, n in ((0.0, 300), (2.5, 200)):  # site B's scores run higher, positives and negatives alike
        y = (torch.rand(n, generator=generator) < 0.4).long()
        logit = shift + 1.2 * y.float() + torch.randn(n, generator=generator)
        sites.append(TensorDataset(torch.stack([logit, torch.zeros(n)], dim=1), y))
    config = task.Config()
    model = Fixed()
    each = [site_statistics(task, model, data, config) for data in sites]
    scores = [[float(torch.sigmoid(v)) for v in data.tensors[0][:, 0]] for data in sites]
    labels = [data.tensors[1].tolist() for data in sites]
    truth = _auroc([v for s in scores for v in s], [v for y in labels for v in y])
    per_site = [_auroc(s, y) for s, y in zip(scores, labels, strict=True)]
    mean = (per_site[0] * 300 + per_site[1] * 200) / 500
    pooled = pool_metrics(task, [e for e in each if e is not None])["auroc"]
    assert abs(pooled - truth) < 0.005, (pooled, truth)  # 200 score bins: close to the exact value
    assert abs(mean - truth) > 0.03, (mean, truth)  # what a weighted mean would have said instead

    # The ServerApp's side: the statistics of each reply's "sums" record, summed there.
    from flwr.app import ConfigRecord

    records = [ConfigRecord(dict(e or {})) for e in each]
    assert pooled_metrics(lambda sums: pool_metrics(task, sums), list(records)) == {"eval-auroc": pooled}
    assert pooled_metrics(lambda sums: pool_metrics(task, sums), [*records, None]) == {}  # a site sent none


def test_held_out_splits_and_intervals() -> None:
    import torch
    from torch.utils.data import TensorDataset

    from flowerbed.heldout import bootstrap, pooled, split_off, wilson

    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)  # the textbook Wilson interval of 8 of 10
    assert all(math.isnan(v) for v in wilson(0, 0))  # no trial, no interval
    data = TensorDataset(torch.arange(50).float().unsqueeze(1), torch.arange(50) % 2)
    kept, test = split_off(data, 0.2, seed=42)
    again = split_off(data, 0.2, seed=42)[1]
    assert len(test) == 10 and len(kept) == 40 and list(test.indices) == list(again.indices)  # the same each round
    assert not set(kept.indices) & set(test.indices)
    ci = bootstrap(lambda d: {"mean": float(torch.stack([d[i][0] for i in range(len(d))]).mean())}, data, seed=1)
    assert ci["mean"][0] < 24.5 < ci["mean"][1] and ci["mean"][1] - ci["mean"][0] < 15
    together = pooled({"a": {"num-test": 10, "test-accuracy": 0.8}, "b": {"num-test": 30, "test-accuracy": 0.6},
                       "c": {"num-test": 0}})  # fmt: skip
    assert together["num-test"] == 40 and abs(together["test-accuracy"] - 0.65) < 1e-9
    assert (together["test-accuracy-lo"], together["test-accuracy-hi"]) == wilson(26, 40)
