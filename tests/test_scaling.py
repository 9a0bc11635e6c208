"""Federated feature standardization: the sites' sums make the global mean and std the model carries.

The arithmetic on real tensors against NumPy's answer on the pooled data; then a real federation on
raw (unscaled) breast-cancer CSVs: the ServerApp's query, feature_scaling.json, the audit trail, the
final model's layer and the site's console, against the statistics of the sites' training splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from flowerbed import audit
from flowerbed.config import RunSettings
from flowerbed.demodata import make_raw_split
from flowerbed.runner import check_result, follow, submit
from flowerbed.scaling import FeatureScaling, combine, feature_sums, fill_scaling, fit_scaling, scaling_layers
from flowerbed.task import load_task
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for


def test_site_sums_combine_to_the_pooled_mean_and_std() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(loc, scale, size=(n, 4)) * [1, 1000, 0.01, 1] for loc, scale, n in ((0, 1, 50), (5, 3, 120))]
    parts[1][:, 3] = 7.0  # a feature constant at one site only
    pooled = np.concatenate(parts)
    sums = [feature_sums(TensorDataset(torch.tensor(p), torch.zeros(len(p)))) for p in parts]
    scaling = combine(sums)
    assert scaling.count == 170
    assert np.allclose(scaling.mean, pooled.mean(0), rtol=1e-9)
    assert np.allclose(scaling.std, pooled.std(0), rtol=1e-6)
    # A feature constant everywhere is divided by 1, not blown up; a non-tensor dataset is read item by item.
    same = combine([feature_sums(Subset(TensorDataset(torch.ones(6, 2), torch.zeros(6)), [0, 2, 4]))])
    assert same.mean == [1.0, 1.0] and same.std == [1.0, 1.0]
    with pytest.raises(ValueError, match="NaN"):
        feature_sums(TensorDataset(torch.tensor([[1.0, float("nan")]]), torch.zeros(1)))
    with pytest.raises(ValueError, match="different widths"):
        combine([sums[0], feature_sums(TensorDataset(torch.ones(2, 3), torch.zeros(2)))])


def test_the_tabular_model_standardizes_first_and_local_models_fit_their_own_data() -> None:
    settings = RunSettings(num_features=3)
    model = load_task("tabular").model(settings)
    assert [name for name, _ in scaling_layers(model)] == ["1"]  # after Flatten, before the first Linear
    assert {"1.mean", "1.std"} <= set(model.state_dict())
    assert not scaling_layers(load_task("images").model(RunSettings(model="cnn")))
    x = torch.tensor([[1.0, 100.0, 0.5], [3.0, 300.0, 0.5]])
    fit_scaling(model, TensorDataset(x, torch.zeros(2, dtype=torch.long)))
    layer = model[1]
    assert isinstance(layer, FeatureScaling)
    assert torch.allclose(layer(x), torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="num_features = 4"):
        fill_scaling(model, combine([feature_sums(TensorDataset(torch.ones(2, 4), torch.zeros(2)))]))


@pytest.mark.federation
def test_raw_features_are_standardized_with_every_sites_statistics(running: RunningFederation, tmp_path: Path) -> None:
    data = make_raw_split(tmp_path / "raw", SITES[:2])
    given = {"min_nodes": 2, "max_rounds": 4, "target_value": None, "patience": 20, "node_wait_s": 120,
             "local_epochs": 2}  # fmt: skip
    settings = RunSettings.model_validate(running.config.run.model_dump() | given)
    with supervised_sites(running.layout, running.gateway, data.site_files, tmp_path / "work") as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        handle = submit(running.layout, settings, name="raw-standardized")
        result = follow(running.layout, handle, timeout_s=300)
    check_result(result, handle)

    # The truth: the sites' training splits, as the task loads them there.
    task = load_task("tabular")
    trains = [task.load_data(path, settings)[0] for path in data.site_files.values()]
    x = torch.cat([t.tensors[0] for t in trains]).double().numpy()  # type: ignore[attr-defined]
    kept = json.loads((handle.out_dir / "feature_scaling.json").read_text())
    assert kept["status"] == "standardized" and kept["examples"] == len(x) and kept["features"] == 30
    assert kept["sites"] == {site: len(t) for site, t in zip(data.site_files, trains, strict=True)}
    assert np.allclose(kept["mean"], x.mean(0), rtol=1e-6) and np.allclose(kept["std"], x.std(0), rtol=1e-5)
    assert max(kept["mean"]) > 500  # raw areas: the case it is for
    # The final model carries them (FedAvg of equal buffers: equal to float32 rounding).
    final = torch.load(handle.out_dir / "final_model.pt", weights_only=True)
    assert torch.allclose(final["1.mean"].double(), torch.tensor(kept["mean"], dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(final["1.std"].double(), torch.tensor(kept["std"], dtype=torch.float64), rtol=1e-5)
    assert result.summary["feature_scaling"] == {k: v for k, v in kept.items() if k not in ("mean", "std")}
    # The coordinator's trail holds the statistics; each site's trail and console say what it sent.
    events = [e["details"] for e in audit.read(running.layout.audit) if e["details"].get("event") == "feature scaling"]
    assert [e["run"] for e in events if e["run"] == handle.out_dir.name] == [handle.out_dir.name]
    mine = next(e for e in events if e["run"] == handle.out_dir.name)
    assert mine["mean"] == kept["mean"] and mine["examples"] == len(x)
    for site, sup in sups.items():
        sent = [e["details"] for e in audit.read(sup.spec.workdir / "audit.jsonl")
                if e["details"].get("message") == "feature statistics"]  # fmt: skip
        assert sent and sent[-1]["examples"] == kept["sites"][site] and sent[-1]["features"] == 30
        assert "for federated standardization" in sup.log_path.read_text(), site  # the site's own console log
    # Standardized, the raw data trains: the last evaluated model is far above the majority share.
    evaluated = [r["eval_accuracy"] for r in result.rows if r["kind"] == "train" and r["eval_accuracy"] is not None]
    assert evaluated[-1] >= 0.85, evaluated
