"""Secure aggregation (SecAgg+): the coordinator learns only the sum of the sites' updates.

The federation test runs the same 3-site run twice on a real coordinator (SuperLink, warm executor,
nginx gateway, TLS and node auth), first with plain FedAvg, then with ``secure_aggregation =
"secagg+"``, and compares each round's model. Every site writes the change it handed to SecAgg+
(``FLOWERBED_SECAGG_INSPECT`` at the site) and the ServerApp writes all it received
(``secagg_inspect``): no reply carried a plaintext array, what it held of each site is a masked vector
uniform over Flower's modulus and unrelated to that site's change, and the sum it unmasked is the
sites' weighted mean change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flowerbed import audit
from flowerbed.clientapp.secure import INSPECT_ENV, clipped
from flowerbed.config import RunSettings
from flowerbed.flower import TRACE_ENV, compat
from flowerbed.runfolder import checkpoint_path
from flowerbed.runner import check_result, follow, submit
from flowerbed.serverapp.secure import protocol_sizes
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for
from tests.test_flower_hooks import traced

MODULUS = 2**32  # Flower's default modulus_range: masked values are uniform on [0, 2**32)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"strategy": "fedmedian"}, "strategy 'fedmedian' needs each update"),
        ({"strategy": "fedadam"}, "strategy 'fedadam' needs each update"),
        ({"dp": "client"}, "use dp = sample"),
        ({"min_nodes": 1}, "min_nodes >= 2"),
        ({"compression": "int8"}, "quantize on their own; use compression = 'none'"),
        ({"compression": "fp16"}, "quantize on their own; use compression = 'none'"),
    ],
)
@pytest.mark.parametrize("mode", ["secagg+", "ckks"])
def test_what_secure_aggregation_cannot_go_with_is_refused_in_one_line(
    settings: dict[str, object], needle: str, mode: str
) -> None:
    with pytest.raises(ValidationError, match=needle):
        RunSettings.model_validate({"secure_aggregation": mode} | settings)


def test_every_site_holds_a_share_of_every_key_and_a_threshold_of_them_unmasks() -> None:
    # Flower's clients fail on an even number of shares below the number of sites; every site is every
    # site's neighbour here (shares = sites), and the threshold is at least 2 and never above the shares.
    assert [protocol_sizes(n, 0.67) for n in (2, 3, 4, 5, 6, 10)] == [(2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (10, 7)]
    assert protocol_sizes(5, 1.0) == (5, 5) and protocol_sizes(5, 0.1) == (5, 2)


def test_a_site_is_told_how_much_of_its_change_secagg_would_clip() -> None:
    change = [np.array([0.5, -9.0, 20.0], dtype=np.float32), np.array([[7.9, -8.1]], dtype=np.float32)]
    assert clipped(change, examples=100, max_weight=100.0, clipping_range=8.0) == 3  # -9, 20, -8.1
    assert clipped(change, examples=50, max_weight=100.0, clipping_range=8.0) == 1  # weighted: only 20 * 0.5


def _changes(folder: Path, site: str, server_round: int) -> list[np.ndarray]:
    with np.load(folder / f"site-{site}-round-{server_round}.npz") as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.federation
def test_secure_aggregation_matches_fedavg_and_the_serverapp_never_holds_an_update(
    running: RunningFederation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_sites, received = tmp_path / "at-sites", tmp_path / "received"
    monkeypatch.setenv(INSPECT_ENV, str(at_sites))  # the sites' SuperNodes inherit it (their own folder)
    trace = tmp_path / "hooks.trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # the sites' half of SecAgg+ is Flower's mod, reached by the kit
    # No federated standardization in the plain run either: a secure run sends no feature sums (the same model).
    base = running.config.run.model_dump() | {"min_nodes": 3, "max_rounds": 3, "patience": 20, "node_wait_s": 120,
                                              "keep_checkpoints": 3, "standardize_features": False}  # fmt: skip
    # inst-a trains on more examples than Flower's default max_weight (1000): each row 8 times.
    files = dict(running.data.site_files)
    header, *rows = files["inst-a"].read_text().splitlines()
    files["inst-a"] = tmp_path / "inst-a-x8" / "data.csv"
    files["inst-a"].parent.mkdir()
    files["inst-a"].write_text("\n".join([header, *rows * 8]) + "\n")
    with supervised_sites(running.layout, running.gateway, files, tmp_path / "work") as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        runs = {}
        for name, extra in (("plain", {}), ("secure", {"secure_aggregation": "secagg+",
                                                        "secagg_inspect": str(received)})):  # fmt: skip
            handle = submit(running.layout, RunSettings.model_validate(base | extra), name=f"secagg-{name}")
            result = follow(running.layout, handle, timeout_s=300)
            check_result(result, handle)
            runs[name] = (handle, result)
    secure_handle, secure_result = runs["secure"]
    assert {compat.SECAGG_MOD.key, compat.FITRES.key} <= traced(trace), traced(trace)
    trained = [r for r in secure_result.rows if r["kind"] == "train"]
    assert [(r["round"], sorted(r["sites"]), r["errors"]) for r in trained] == [
        (i, sorted(SITES), []) for i in (1, 2, 3)
    ]
    assert all(r["train_loss"] is not None and r["eval_loss"] is not None for r in trained)  # metrics in the clear

    # The same model as plain FedAvg, round by round (SecAgg+ quantizes to 2**22 steps over +-8).
    for server_round in (1, 2, 3):
        plain = torch.load(checkpoint_path(runs["plain"][0].out_dir, server_round), weights_only=True)
        secure = torch.load(checkpoint_path(secure_handle.out_dir, server_round), weights_only=True)
        assert plain.keys() == secure.keys()
        gap = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
        assert gap < 1e-3, (server_round, gap)

    # What the ServerApp received: no arrays in any reply of any stage, only masked vectors.
    lines = [json.loads(line) for line in (received / "received.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"setup", "share keys", "collect masked vectors", "unmask"}
    assert len(lines) == 3 * 4 * 3  # 3 rounds, 4 stages, 3 sites
    assert all(sum(line["array_bytes"].values()) == 0 for line in lines), lines
    for server_round in (1, 2, 3):
        masked = {int(p.stem.rsplit("-", 1)[1]): p for p in received.glob(f"round-{server_round}-node-*.npz")}
        assert len(masked) == 3
        changes = {site: _changes(at_sites, site, server_round) for site in SITES}
        flat_changes = {site: np.concatenate([c.ravel() for c in arrays]) for site, arrays in changes.items()}
        for path in masked.values():
            with np.load(path) as data:
                vector = np.concatenate([data[f"arr_{i}"].ravel() for i in range(len(data.files))]).astype(np.float64)
            # uniform on [0, 2**32): mean 2**31, no relation to any site's change
            assert abs(vector.mean() / MODULUS - 0.5) < 0.05, vector.mean()
            for site, change in flat_changes.items():
                values = vector[1 : 1 + change.size]  # the first value is the masked weight
                corr = np.corrcoef(values, change.astype(np.float64))[0, 1]
                assert abs(corr) < 0.2, (site, corr)
    # The trails: each site logged its masked vector, and the coordinator's round event holds the same digests.
    coordinator = audit.read(running.layout.audit)
    events = [e["details"] for e in coordinator if e["kind"] == audit.ROUND
              and e["details"].get("run") == secure_handle.out_dir.name and e["details"]["kind"] == "train"]  # fmt: skip
    assert [e["round"] for e in events] == [1, 2, 3] and all(set(e["masked_updates"]) == set(SITES) for e in events)
    examples: dict[str, int] = {}
    for site, sup in sups.items():
        trail = audit.read(sup.spec.workdir / "audit.jsonl")
        sent = [e["details"]["masked_sha256"] for e in trail if e["details"].get("message") == "secagg-masked"]
        assert [e["masked_updates"][site] for e in events] == sent[-3:], site
        trained_events = [e["details"] for e in trail if e["details"].get("message") == "train"
                          and e["details"].get("update_sha256")]  # fmt: skip
        examples[site] = trained_events[-1]["examples"]
        log = sup.log_path.read_text()
        assert "with SecAgg+" in log and "the coordinator learns only the sum" in log
    assert examples["inst-a"] > 1000 > examples["inst-b"], examples

    # What the ServerApp unmasked is the sites' mean change, weighted by their example counts (FedAvg).
    total = sum(examples.values())
    for server_round in (2, 3):
        before = torch.load(checkpoint_path(secure_handle.out_dir, server_round - 1), weights_only=True)
        after = torch.load(checkpoint_path(secure_handle.out_dir, server_round), weights_only=True)
        changes = {site: _changes(at_sites, site, server_round) for site in SITES}
        for index, name in enumerate(after):
            expected = sum(examples[s] * changes[s][index].astype(np.float64) for s in SITES) / total
            got = (after[name].double() - before[name].double()).numpy()
            assert np.abs(got - expected).max() < 1e-4, (server_round, name)


@pytest.mark.federation
def test_a_site_that_requires_secure_aggregation_trains_only_under_it(
    running: RunningFederation, tmp_path: Path
) -> None:
    """site.toml ``require_secure_aggregation = true`` at inst-b: a plain run fails in round 1 with inst-b's
    one-line refusal (what the coordinator must do); the same sites then train under SecAgg+."""
    files = {site: running.data.site_files[site] for site in SITES[:2]}
    base = running.config.run.model_dump() | {"min_nodes": 2, "max_rounds": 1, "node_wait_s": 120}
    with supervised_sites(running.layout, running.gateway, files, tmp_path / "work",
                          secure_only=frozenset({"inst-b"})) as sups:  # fmt: skip
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        plain = submit(running.layout, RunSettings.model_validate(base), name="secure-only-plain")
        refused = follow(running.layout, plain, timeout_s=200)
        secure = submit(running.layout, RunSettings.model_validate(base | {"secure_aggregation": "secagg+"}),
                        name="secure-only-secagg")  # fmt: skip
        done = follow(running.layout, secure, timeout_s=200)
        check_result(done, secure)
    summary = json.loads((plain.out_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert (
        "site inst-b: trains only in runs with secure aggregation (require_secure_aggregation in its site.toml), "
        "so its update never reaches the coordinator alone: run with --secure-aggregation secagg+"
    ) in summary["stop_reason"]
    assert [r["kind"] for r in refused.rows] == ["failed"]
    trained = [r for r in done.rows if r["kind"] == "train"]
    assert [sorted(r["sites"]) for r in trained] == [["inst-a", "inst-b"]]
    # It refused the plain run at its first message, the feature statistics before round 1 (nothing in the clear).
    assert "feature statistics REFUSED: site inst-b: trains only" in sups["inst-b"].log_path.read_text()
