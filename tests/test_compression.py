"""Update compression (fp16, int8 with error feedback): the codec, both sides' bookkeeping, real runs.

The codec and the coordinator's view are checked on Flower's own records and messages; the runs are
real federations on the shared coordinator (SuperLink, gateway, three supervised SuperNodes), none
against fp16 and int8, and int8 under DP-SGD.
"""

from __future__ import annotations

import stat
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flowerbed import compression as codec
from flowerbed.clientapp import compression as site
from flowerbed.clientapp.data import DataError
from flowerbed.config import RunSettings
from flowerbed.runner import check_result, follow, submit
from flowerbed.serverapp.compression import Broadcast
from flowerbed.supernode.supervisor import Supervisor
from tests.conftest import RunningFederation, supervised_sites, wait_for

RNG = np.random.default_rng(7)


def model_state(scale: float = 1.0) -> codec.State:
    return {"w": (RNG.standard_normal((256, 128)) * scale).astype(np.float32),
            "b": (RNG.standard_normal(256) * scale).astype(np.float32),
            "steps": np.array(3, dtype=np.int64)}  # fmt: skip


def test_fp16_and_int8_round_trip_within_their_precision() -> None:
    change = model_state(0.01)
    half, _ = codec.encode(change, "fp16")
    back = codec.decode(half, change)
    assert np.allclose(back["w"], change["w"], rtol=1e-3, atol=1e-6) and back["steps"] == 3
    packed, left = codec.encode(change, "int8")
    assert packed["w"].numpy().dtype == np.int8 and packed["w@scale"].numpy().shape == (256,)  # a scale per row
    assert packed["b@scale"].numpy().shape == (1,)  # one scale for a 1-D tensor
    back = codec.decode(packed, change)
    step = np.abs(change["w"]).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back["w"] - change["w"]) <= step / 2 + 1e-9)
    assert np.allclose(back["w"] + left["w"], change["w"], atol=1e-7)  # the residual is exactly what was lost
    assert codec.nbytes(packed) < codec.nbytes(ArrayRecord({k: Array(v) for k, v in change.items()})) / 3.5


def test_int8_error_feedback_sends_what_rounding_lost_later() -> None:
    """Over many rounds the decoded changes add up to the true ones: the residual stays one step small."""
    residual: codec.State | None = None
    true_sum, sent_sum = np.zeros((256, 128), np.float32), np.zeros((256, 128), np.float32)
    for _ in range(50):
        change = model_state(0.01)
        record, residual = codec.encode(change, "int8", residual)
        true_sum += change["w"]
        sent_sum += codec.decode(record, change)["w"]
    assert np.allclose(sent_sum + residual["w"], true_sum, atol=1e-5)
    assert np.abs(residual["w"]).max() < 0.01  # bounded by one quantization step, not growing with rounds


def _round(broadcast: Broadcast, model: codec.State, nodes: list[int], folders: dict[int, Path],
           answering: list[int]) -> dict[int, Message]:  # fmt: skip
    """One round: the coordinator's broadcast, each answering site's real receive/train/reply, decoded."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                          "config": ConfigRecord({"server-round": 1})})  # fmt: skip
    messages = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
    broadcast.prepare(messages, content.array_records["arrays"])
    replies = {}
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in answering:
            continue
        record = message.content.config_records[codec.RECORD]
        try:
            view = site.receive(message.content.array_records["arrays"], record, model, folders[node], run_id=5)
        except DataError:
            continue
        trained = {k: (v + 0.01 * node if codec.is_float(v) else v) for k, v in view.items()}  # a "training" step
        arrays, sent = site.reply(trained, view, broadcast.kind, folders[node], run_id=5)
        replies[node] = Message(RecordDict({"arrays": arrays, codec.RECORD: sent}), reply_to=message)
    broadcast.decode(list(replies.values()))
    return replies


@pytest.mark.usefixtures("in_a_task")
def test_the_view_goes_out_whole_then_as_int8_changes_and_whole_again_to_a_site_that_missed_a_round(
    tmp_path: Path,
) -> None:
    nodes = [11, 12, 13]
    folders = {n: tmp_path / str(n) for n in nodes}
    broadcast = Broadcast("int8")
    model = model_state()
    replies = _round(broadcast, model, nodes, folders, answering=[11, 12])  # 13 is away
    assert broadcast.holders == {11, 12}
    for node, reply in replies.items():  # the change decoded onto the view: that site's model
        got = codec.state_of(reply.content.array_records["arrays"])
        assert np.allclose(got["w"], model["w"] + 0.01 * node, atol=np.abs(model["w"]).max() / 127)
    model = {k: (v + 0.05 if codec.is_float(v) else v) for k, v in model.items()}  # the next global model
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()})})
    messages = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
    view = broadcast.prepare(messages, content.array_records["arrays"])
    forms = {m.metadata.dst_node_id: m.content.config_records[codec.RECORD]["of"] for m in messages}
    assert forms == {11: codec.DELTA, 12: codec.DELTA, 13: codec.MODEL}  # 13 missed round 1: the whole view
    assert messages[0].content is messages[1].content  # holders share one packed content
    sizes = {m.metadata.dst_node_id: codec.nbytes(m.content.array_records["arrays"]) for m in messages}
    assert sizes[11] < sizes[13] / 3
    for message in messages:  # every site ends up with the same view, whichever form it got
        node = message.metadata.dst_node_id
        held = site.receive(message.content.array_records["arrays"], message.content.config_records[codec.RECORD],
                            model, folders[node], run_id=5)  # fmt: skip
        assert codec.digest(held) == codec.digest(view)
    files = list(folders[11].glob("run-5.*.npz"))
    assert {f.name for f in files} == {"run-5.view.npz", "run-5.residual.npz"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


@pytest.mark.usefixtures("in_a_task")
def test_a_change_from_a_view_the_site_lacks_is_refused_and_not_aggregated(tmp_path: Path) -> None:
    broadcast = Broadcast("int8")
    folders = {21: tmp_path / "a", 22: tmp_path / "b"}
    model = model_state()
    _round(broadcast, model, [21, 22], folders, answering=[21, 22])
    for path in folders[22].glob("run-5.view.npz"):
        path.unlink()  # the site lost its view (a new VM, a wiped work folder)
    replies = _round(broadcast, model, [21, 22], folders, answering=[21, 22])
    assert set(replies) == {21} and broadcast.holders == {21}  # 22 refused: it gets the whole model next round
    stranger = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((256, 128), np.int8))}),
                                   codec.RECORD: codec.config("int8", codec.DELTA, base="not-the-view")}),
                       dst_node_id=23, message_type="train")  # fmt: skip
    broadcast.decode([stranger])
    assert "arrays" not in stranger.content  # never taken for a model: the round names the reply


@pytest.fixture(scope="module")
def sites(running: RunningFederation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Supervisor]]:
    work = tmp_path_factory.mktemp("compression-sites")
    with supervised_sites(running.layout, running.gateway, dict(running.data.site_files), work) as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        yield sups


def _run(running: RunningFederation, name: str, **changes: object) -> list[dict[str, object]]:
    settings = RunSettings.model_validate(
        running.config.run.model_dump()
        | {
            "max_rounds": 5,
            "min_nodes": 3,
            "patience": 50,
            "target_value": None,
            "keep_checkpoints": 1,
            "hidden_units": 256,
            **changes,
        }
    )  # fmt: skip  (34 kB a model: the records beside it are noise)
    handle = submit(running.layout, settings, name=name)
    result = follow(running.layout, handle, timeout_s=300)
    check_result(result, handle)
    return result.rows


@pytest.mark.federation
def test_compressed_runs_learn_as_the_plain_one_with_fewer_bytes(
    running: RunningFederation, sites: dict[str, Supervisor]
) -> None:
    rows = {kind: _run(running, f"compress-{kind}", compression=kind) for kind in ("none", "fp16", "int8")}
    trained = {k: [r for r in v if r["kind"] == "train"] for k, v in rows.items()}
    assert all(len(t) == 5 and all(r["nodes"] == 3 for r in t) for t in trained.values())
    up = {k: statistics.median(r["traffic"]["up"] for r in t) for k, t in trained.items()}
    down = {k: statistics.median(r["traffic"]["down"] for r in t[1:]) for k, t in trained.items()}  # round 2 on
    assert up["fp16"] < 0.6 * up["none"] and up["int8"] < 0.4 * up["none"], up
    assert down["fp16"] < 0.6 * down["none"] and down["int8"] < 0.4 * down["none"], down
    final = {k: next(r for r in v if r["kind"] == "final-eval")["eval_accuracy"] for k, v in rows.items()}
    assert abs(final["fp16"] - final["none"]) <= 0.02 and abs(final["int8"] - final["none"]) <= 0.05, final
    for sup in sites.values():  # each site's view and residual of the int8 run, private to it
        files = list((sup.spec.workdir / "compression").glob("run-*.npz"))
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


@pytest.mark.federation
def test_int8_composes_with_dp_sgd(running: RunningFederation, sites: dict[str, Supervisor]) -> None:
    rows = _run(running, "compress-dp", compression="int8", dp="sample", dp_epsilon=50, max_rounds=3)
    trained = [r for r in rows if r["kind"] == "train"]
    assert len(trained) == 3 and all(r["nodes"] == 3 for r in trained)
    assert all(r["privacy"] and all(0 < e <= 50 for e in r["privacy"].values()) for r in trained)
