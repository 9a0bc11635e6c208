"""Every metric a task reports, everywhere: history.csv, the plot, the notebook's DataFrame, the summary line;
the final evaluation is a row of its own kind, never a round.

Real files written by the run folder's own writer (the federated path is in tests/test_runs.py).
"""

from __future__ import annotations

import csv
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
