"""A bad update never reaches the model: NaN values, another shape, no examples, an outlier norm.

The checks on Flower's records alone, then a real federation: an own task that sends NaN at one
site and a model of another shape at another; the run goes on with the site that behaves, every
checkpoint stays finite. Then a learning rate of 1e30 at every site: the run stops non-zero, each
site named, and no NaN model is ever written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from flowerbed import flower
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from flowerbed.flower import TRACE_ENV
from flowerbed.serverapp.loop import BestModel
from flowerbed.serverapp.validate import non_finite_values, spec_of, update_problem
from tests.conftest import SITES, coordinator, make_config, make_federation, run_cli, supervised_sites
from tests.test_flower_hooks import on_path, traced
from tests.test_taskpkg import site_toml

FAULTS = """

_REAL_LOAD, _REAL_TRAIN = Task.load_data, Task.train


def _load_data(self, path, config):  # a site whose data folder says so misbehaves (for the tests)
    self.fault = next((f for f in ("nan", "shape") if f"{f}-site" in str(path)), "")
    return _REAL_LOAD(self, path, config)


def _train(self, model, data, config):
    metrics = _REAL_TRAIN(self, model, data, config)
    if self.fault == "nan":
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    elif self.fault == "shape":
        model[2] = nn.Linear(config.hidden_units, 3)  # this site's model differs from everyone's
    return metrics


Task.load_data, Task.train = _load_data, _train
"""


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _reply(arrays: dict[str, np.ndarray], examples: object = 10) -> Message:
    content = RecordDict({"arrays": _record(arrays),
                          "metrics": MetricRecord({"num-examples": examples})})  # type: ignore[dict-item]  # fmt: skip
    metadata = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")  # fmt: skip
    return Message(content, metadata=metadata)


def test_each_update_is_checked_before_aggregation() -> None:
    model = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    expected = _record(model)
    assert update_problem(_reply(model), expected) is None
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.array([np.inf, 0], np.float32)}
    assert update_problem(_reply(nan), expected) == "update has 7 non-finite (NaN or infinite) values"
    wide = {"w": np.zeros((2, 4), np.float32), "b": model["b"]}
    assert update_problem(_reply(wide), expected) == "update tensor w has shape [2, 4], the model's is [2, 3]"
    assert update_problem(_reply({"w": model["w"]}), expected) == "update tensors differ from the model's: lacks b"
    double = {"w": model["w"].astype(np.float64), "b": model["b"]}
    assert update_problem(_reply(double), expected) == "update tensor w is float64, the model's is float32"
    assert update_problem(_reply(model, 0), expected) == "it reports 0 training examples (must be > 0)"
    far = {"w": np.full((2, 3), 2.0, np.float32), "b": model["b"]}
    assert update_problem(_reply(far), expected, max_update_norm=5.0) is None  # norm sqrt(24) = 4.9
    assert update_problem(_reply(far), expected, max_update_norm=4.0) == ("update norm 4.899 exceeds max_update_norm 4")
    assert non_finite_values(_record(nan)) == 7 and non_finite_values(expected) == 0
    # An integer buffer (BatchNorm's batch count) comes back from aggregation as float; the sites' stays integer.
    built = _record({"w": model["w"], "count": np.array(3, np.int64)})
    aggregated = _record({"w": model["w"], "count": np.array(3.0, np.float64)})
    update = {"w": model["w"], "count": np.array(4, np.int64)}
    assert update_problem(_reply(update), built, max_update_norm=5.0, current=aggregated) is None


def test_an_update_is_checked_one_tensor_at_a_time_against_the_models_spec() -> None:
    """A 100 MB model is not copied whole to check an update: the model's side is its names, shapes and
    dtypes (no value read), the update's side one tensor at a time; a tensor that is not numpy's is named."""
    import tracemalloc

    model = {f"w{i}": np.full((1024, 1024), 0.5, np.float32) for i in range(4)}  # 4 x 4 MiB
    spec = spec_of(_record(model))
    assert spec["w0"] == ((1024, 1024), "float32")
    reply, current = _reply(model), _record(model)
    tracemalloc.start()
    try:
        assert update_problem(reply, spec, max_update_norm=1.0, current=current) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 4 * 2**20, peak  # a tensor of each and the reading's buffers (both models whole: 32 MiB)
    torn = _reply(model)
    torn.content["arrays"]["w2"] = Array(dtype="float32", shape=(1024, 1024), stype="numpy.ndarray", data=b"x" * 64)
    said = update_problem(torn, spec)
    assert said is not None and said.startswith("update tensor w2 cannot be read"), said
    with pytest.raises(TypeError, match="needs the model sent"):
        update_problem(reply, spec, max_update_norm=1.0)


def test_only_a_finite_model_is_ever_the_best() -> None:
    best = BestModel()
    arrays = _record({"w": np.zeros(1, np.float32)})
    assert not best.offer(1, float("nan"), 0.9, arrays, 0.0) and best.round is None
    assert best.offer(2, 0.5, 0.8, arrays, 0.0) and not best.offer(3, float("inf"), None, arrays, 0.0)
    assert best.round == 2


@pytest.fixture(scope="module")
def faulty_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faulty")
    assert run_cli("task", "new", "faulty", "--dir", str(root)).returncode == 0
    module = root / "faulty" / "flowerbed_task_faulty" / "task.py"
    module.write_text(module.read_text().replace("\ntask = Task()\n", FAULTS + "\ntask = Task()\n"))
    built = run_cli("task", "build", str(root / "faulty"), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return Path(next(line for line in built.stdout.splitlines() if line.endswith(".whl")).strip())


def _finite_models(out_dir: Path) -> list[Path]:
    files = sorted(out_dir.rglob("*.pt"))
    for path in files:
        state = torch.load(path, weights_only=True)
        tensors = state.values() if isinstance(state, dict) else [state]
        assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor)), path
    return files


@pytest.mark.federation
def test_a_site_that_sends_nan_or_another_shape_is_dropped_and_the_run_goes_on(
    tmp_path: Path, faulty_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also the canary federation of Flower's internals: every hook on a run's path is called."""
    trace = tmp_path / "hooks.trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # every process of the stack, the sites and the CLI inherit it
    a, b, c = SITES
    config = make_config("updates", SITES, min_nodes=1, max_rounds=2, patience=10)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    files = {a: data.site_files[a]}
    for site, fault in ((b, "nan"), (c, "shape")):
        files[site] = tmp_path / f"{fault}-site" / data.site_files[site].name
        files[site].parent.mkdir()
        shutil.copyfile(data.site_files[site], files[site])
    kits = {site: site_toml(tmp_path / "kits" / site, site, config) for site in SITES}
    for kit in kits.values():
        assert run_cli("supernode", "approve", str(faulty_wheel), "--yes", cwd=kit.parent).returncode == 0
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", files, tmp_path / "work",
                              site_files=kits):  # fmt: skip
            own = run_cli("run", "-d", str(layout.root), "--name", "own", "--task", str(faulty_wheel), timeout=600,
                          cwd=tmp_path)  # fmt: skip
            diverged = run_cli("run", "-d", str(layout.root), "--name", "diverged", "--task", "tabular",
                               "--learning-rate", "1e30", "--max-rounds", "3", "--min-nodes", "2", timeout=600,
                               cwd=tmp_path)  # fmt: skip
    text = " ".join((own.stdout + own.stderr).split())
    assert own.returncode == 0, text
    missing = on_path(flower.superlink, flower.supernode, flower.superexec, flower.compat, flower.arrays) - traced(
        trace
    )
    assert not missing, f"hooks never called on a run's path (Flower {flower.version()}): {sorted(missing)}"
    rows = [json.loads(line) for line in (layout.runs / "own" / "history.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "train"]
    assert len(trained) == 2 and all(r["sites"] == [a] and r["nodes"] == 1 for r in trained), trained
    for row in trained:
        errors = " ".join(row["errors"])
        assert f"site {b}: update has" in errors and "non-finite (NaN or infinite) values; dropped" in errors, errors
        assert f"site {c}: update tensor 2.weight has shape [3, 32], the model's is [2, 32]; dropped" in errors
    assert f"site {b}: update has" in text  # the console names them too
    assert _finite_models(layout.runs / "own")  # checkpoints, best.pt and final_model.pt

    text = " ".join((diverged.stdout + diverged.stderr).split())
    assert diverged.returncode == ExitCode.RUN_FAILED, text
    assert "Traceback" not in text
    summary = json.loads((layout.runs / "diverged" / "summary.json").read_text())
    assert summary["status"] == "failed" and "valid replies, min-nodes is 2" in summary["stop_reason"], summary
    for site in (a, b, c):
        assert f"site {site}: update has" in summary["stop_reason"], summary["stop_reason"]
    _finite_models(layout.runs / "diverged")  # no NaN model was ever written
