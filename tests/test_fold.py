"""The running weighted sum (serverapp/fold.py): what Flower's strategies make of all a round's updates,
made from one update at a time, each screened as it arrives and let go once added."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from flowerbed.config import RunSettings
from flowerbed.serverapp.fold import Fold, folds, held_why
from flowerbed.serverapp.strategies import make_strategy
from flowerbed.serverapp.validate import spec_of

RNG = np.random.default_rng(7)


def _model(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": (RNG.standard_normal((64, 32)) * scale).astype(np.float32),
            "b": (RNG.standard_normal(64) * scale).astype(np.float32),
            "steps": np.array(3, dtype=np.int64)}  # an integer buffer (BatchNorm's count)  # fmt: skip


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _reply(arrays: dict[str, np.ndarray] | None, examples: float, loss: float, node: int) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
                          "site": ConfigRecord({"name": f"site-{node}"})})  # fmt: skip
    if arrays is not None:
        content["arrays"] = _record(arrays)
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"m{node}", group_id="1", created_at=0.0, ttl=60.0, message_type="train")  # fmt: skip
    return Message(content, metadata=metadata)


def _as_dict(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None
    return {name: array.numpy() for name, array in record.items()}


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_the_folded_round_aggregates_as_the_strategy_does_with_every_update_held(strategy: str) -> None:
    settings = RunSettings(strategy=strategy, proximal_mu=0.1 if strategy == "fedprox" else 0.0)
    current = _model()
    updates = [{k: (v + RNG.standard_normal(v.shape).astype(v.dtype) * 0.1 if v.dtype.kind == "f" else v)
                for k, v in current.items()} for _ in range(4)]  # fmt: skip
    examples, losses = [120, 30, 75, 200], [0.5, 0.9, 0.7, 0.3]
    held = [_reply(u, n, loss, i) for i, (u, n, loss) in enumerate(zip(updates, examples, losses, strict=True))]
    whole = make_strategy(settings)
    folded_strategy = make_strategy(settings)
    for s in (whole, folded_strategy):  # FedAdam's server step starts from the model it sent (its configure_train)
        if hasattr(s, "current_arrays"):
            s.current_arrays = {k: v.copy() for k, v in current.items()}
    want_arrays, want_metrics = whole.aggregate_train(1, held)

    fold = Fold(spec_of(_record(current)), _record(current))
    kept = [
        fold.take(_reply(u, n, loss, i)) for i, (u, n, loss) in enumerate(zip(updates, examples, losses, strict=True))
    ]
    assert all("arrays" not in reply.content for reply in kept)  # each update let go once added
    assert all("site" in reply.content and "metrics" in reply.content for reply in kept)  # the rest kept
    assert fold.count == 4 and fold.weight == sum(examples)
    got_arrays, got_metrics = fold.aggregate(folded_strategy, 1, kept)
    assert "arrays" not in kept[0].content  # the reply lent for the call has its own content back

    want, got = _as_dict(want_arrays), _as_dict(got_arrays)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert np.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
    assert want_metrics is not None and got_metrics is not None
    assert dict(got_metrics.items()) == pytest.approx(dict(want_metrics.items()))


def test_a_bad_update_is_named_and_not_added() -> None:
    current = _model()
    fold = Fold(spec_of(_record(current)), _record(current), max_update_norm=5.0)
    nan = {k: v.copy() for k, v in current.items()}
    nan["w"][0, 0] = np.nan
    far = {k: (v + 10.0 if v.dtype.kind == "f" else v) for k, v in current.items()}
    shape = {**current, "b": np.zeros(3, np.float32)}
    replies = [fold.take(_reply(a, 10, 0.1, i)) for i, a in enumerate([current, nan, far, shape, None])]
    problems = [fold.problem(r) for r in replies]
    assert problems[0] is None
    assert problems[1] is not None and "non-finite" in problems[1]
    assert problems[2] is not None and "exceeds max_update_norm" in problems[2]
    assert problems[3] is not None and "shape [3]" in problems[3]
    assert problems[4] == "its reply has no model update"
    assert fold.count == 1 and fold.weight == 10  # only the good one is in the sum
    assert np.allclose(_as_dict(fold.mean())["w"], current["w"])


def test_fedavgs_aggregate_of_a_folded_round_is_the_mean_itself_and_uses_the_sums_up() -> None:
    """FedAvg's (and FedProx's) aggregate of one reply of weight 1 is a second copy of it: the mean is handed
    back as it is, and the sums go as the mean is made (a 100 MB model: 200 MB fewer at the round's end)."""
    current = _model()
    fold = Fold(spec_of(_record(current)), _record(current))
    updates = [{k: v * (i + 1) if v.dtype.kind == "f" else v for k, v in current.items()} for i in range(3)]
    kept = [fold.take(_reply(u, 10, 0.5, i)) for i, u in enumerate(updates)]
    arrays, metrics = fold.aggregate(make_strategy(RunSettings()), 1, kept)
    assert fold.sums == {}  # used up
    got = _as_dict(arrays)
    assert got["w"].dtype == np.float32 and np.allclose(got["w"], current["w"] * 2, rtol=1e-6)  # (1 + 2 + 3) / 3
    assert got["steps"].dtype == np.float64 and got["steps"] == 3.0  # an integer buffer's mean, as Flower makes it
    assert metrics is not None and metrics["train-loss"] == pytest.approx(0.5)


def test_which_runs_fold_and_which_hold_every_update_and_why() -> None:
    assert folds(RunSettings()) and folds(RunSettings(strategy="fedadam"))
    assert not folds(RunSettings(strategy="fedmedian"))
    assert held_why(RunSettings(strategy="fedmedian")) == "strategy fedmedian needs every update of a round at once"
    assert not folds(RunSettings(dp="client"))
    assert "clips each update" in (held_why(RunSettings(dp="client")) or "")
    assert (
        not folds(RunSettings(secure_aggregation="secagg+"))
        and held_why(RunSettings(secure_aggregation="ckks")) is None
    )


def test_a_run_that_holds_more_than_a_gigabyte_of_updates_is_warned_about_before_it_starts() -> None:
    import torch

    from flowerbed.runner import memory_warning

    model = torch.nn.Linear(3000, 1000)  # 12 MB: 100 sites' updates are 1.2 GB
    said = memory_warning(model, RunSettings(strategy="fedmedian"), 100)
    assert said is not None and said.startswith("strategy fedmedian needs every update of a round at once")
    assert "100 updates of 11 MB" in said and "fedavg, fedprox and fedadam add each update as it arrives" in said
    assert memory_warning(model, RunSettings(strategy="fedavg"), 100) is None  # folded: nothing held
    assert memory_warning(model, RunSettings(strategy="fedmedian"), 10) is None  # 120 MB: not worth a line
