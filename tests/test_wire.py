"""One flat array per message (flowerbed.wire): the same content back, and a handful of objects.

Flower's own records and messages, no federation: the federation tests run every round through
``exchange`` and the ClientApp's mod, packed (``benchmarks/requests.py`` counts the requests).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flowerbed import wire


def objects(obj: object) -> int:
    """How many objects Flower moves for ``obj``: itself and its descendants (one request each)."""
    children = getattr(obj, "children", None) or {}
    return 1 + sum(objects(child) for child in children.values())


def model_content(layers: int = 30) -> RecordDict:
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
    return RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({"server-round": 3, "lr": 0.01, "task": "tabular", "on": True,
                                "key": b"\x00\x01\xff", "shares": [b"ab", b"", b"c"], "ints": [1, 2]}),
        "metrics": MetricRecord({"loss": float("nan"), "num-examples": 137, "per-class": [0.5, 0.25]}),
    })  # fmt: skip


def test_pack_gives_the_same_content_back_in_a_handful_of_objects() -> None:
    content = model_content()
    packed = wire.pack(content)
    assert wire.is_packed(packed) and not wire.is_packed(content)
    back = wire.unpack(packed)
    assert back.object_id == content.object_id  # byte for byte what Flower would have sent
    assert list(back.keys()) == ["arrays", "config", "metrics"]
    assert back.config_records["config"]["shares"] == [b"ab", b"", b"c"]
    assert math.isnan(back.metric_records["metrics"]["loss"])  # a NaN update's metrics are screened, not lost
    state = back.array_records["arrays"].to_torch_state_dict()
    assert all(torch.equal(state[k], v) for k, v in content.array_records["arrays"].to_torch_state_dict().items())
    assert objects(content) == 1 + 1 + 60 * 2 + 2  # record dict, array record, 60 arrays and their chunks, 2 records
    assert objects(packed) == 2  # record dict, one config record holding the blob
    assert wire.unpack(content) is content  # not packed: as it is


def test_a_large_model_is_one_array_in_flowers_5_mib_chunks() -> None:
    """Above 4 MiB the blob is an array: Flower chunks it (no request larger than Flower's own)."""
    content = RecordDict({"arrays": ArrayRecord(torch.nn.Linear(2000, 1500).state_dict())})  # 12 MB
    packed = wire.pack(content)
    assert isinstance(packed[wire.PACKED], ArrayRecord)
    assert objects(packed) == 1 + 1 + 1 + 3  # record dict, array record, one array, its three 5 MiB chunks
    assert wire.unpack(packed).object_id == content.object_id


def test_a_small_blob_travels_deflated_and_a_zip_bomb_is_refused() -> None:
    """A small model's int8 codes and its manifest deflate (fewer bytes per message); a large blob is left as it
    is; a deflated blob that would grow beyond INFLATE_MAX is refused, not read into memory."""
    codes = torch.clamp(torch.round(torch.randn(64, 64) * 20), -127, 127).to(torch.int8)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(codes.numpy())}),
                          "metrics": MetricRecord({f"class-{i}-recall": 0.5 for i in range(10)})})  # fmt: skip
    blob = wire.pack(content).config_records[wire.PACKED][wire.BLOB]
    assert isinstance(blob, bytes) and blob.startswith(wire.DEFLATED)
    assert len(blob) < 0.95 * (codes.numel() + 200)  # smaller than the codes and a short manifest
    assert wire.unpack(wire.pack(content)).object_id == content.object_id
    large = RecordDict({"arrays": ArrayRecord({"w": Array(torch.zeros(300_000).numpy())})})  # 1.2 MB of zeros
    assert wire._blob(wire.pack(large)[wire.PACKED])[: len(wire.MAGIC)] == wire.MAGIC  # above DEFLATE_MAX: as it is
    bomb = wire.DEFLATED + zlib.compress(b"\x00" * (wire.INFLATE_MAX + 10))
    with pytest.raises(wire.WireError, match="inflates beyond"):
        wire.unpack(RecordDict({wire.PACKED: ConfigRecord({wire.BLOB: bomb})}))
    with pytest.raises(wire.WireError, match="cut short"):
        wire.unpack(RecordDict({wire.PACKED: ConfigRecord({wire.BLOB: blob[:-20]})}))


@pytest.mark.usefixtures("in_a_task")
def test_a_torn_or_foreign_blob_is_named_and_a_reply_of_it_loses_its_content() -> None:
    packed = wire.pack(model_content(2))
    blob = packed.config_records[wire.PACKED][wire.BLOB]
    assert isinstance(blob, bytes)
    torn = RecordDict({wire.PACKED: ArrayRecord({wire.BLOB: Array(dtype="uint8", shape=(100,), stype=wire.STYPE,
                                                                   data=blob[:100])})})  # fmt: skip
    with pytest.raises(wire.WireError, match=r"cut short|manifest"):
        wire.unpack(torn)
    other = RecordDict({wire.PACKED: ArrayRecord({wire.BLOB: Array(dtype="uint8", shape=(4,), stype=wire.STYPE,
                                                                    data=b"PK\x03\x04")})})  # fmt: skip
    with pytest.raises(wire.WireError, match="another flowerbed version"):
        wire.unpack(other)
    item = {"key": "w", "dtype": "float32", "shape": [10], "stype": wire.NUMPY, "at": 0, "size": 8, "npy": "<f4",
            "npy_shape": [10]}  # fmt: skip
    manifest = json.dumps({"records": [{"name": "arrays", "kind": "arrays", "arrays": [item]}]}).encode()
    lying = wire.MAGIC + struct.pack("<Q", len(manifest)) + manifest + bytes(8)  # 2 floats said to be 10
    with pytest.raises(wire.WireError, match="does not match its shape"):
        wire.unpack(RecordDict({wire.PACKED: ConfigRecord({wire.BLOB: lying})}))
    reply = Message(torn, dst_node_id=1, message_type="train")
    assert len(wire.unpack_message(reply).content.keys()) == 0  # the round names a reply without a model


@pytest.mark.usefixtures("in_a_task")
def test_the_clientapps_mod_unpacks_for_the_handler_and_packs_its_reply() -> None:
    content = model_content(3)
    sent = Message(wire.pack(content), dst_node_id=7, message_type="train")
    seen: list[RecordDict] = []

    def handler(msg: Message, _context: Context) -> Message:
        seen.append(msg.content)
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"],
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)  # fmt: skip

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = wire.packing_mod(sent, context, handler)
    assert seen[0].object_id == content.object_id  # the handler saw Flower's records
    assert wire.is_packed(reply.content)
    assert wire.unpack(reply.content).array_records["arrays"].object_id == content.array_records["arrays"].object_id
    plain = Message(model_content(3), dst_node_id=7, message_type="train")
    assert not wire.is_packed(wire.packing_mod(plain, context, handler).content)  # an unpacked message: as it came


def test_a_view_reads_an_array_where_it_lies_as_numpy_would() -> None:
    """wire.view: the values np.load would give, read-only and without a copy of them; a short or pickled
    array raises as np.load does."""
    import numpy as np

    for value in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((3, 4))),
                  np.array(3, dtype=np.int64), np.zeros((0, 5), dtype=np.float16)):  # fmt: skip
        array = Array(value)
        seen = wire.view(array)
        assert seen.dtype == value.dtype and seen.shape == value.shape and np.array_equal(seen, value)
        assert not seen.flags.writeable and not seen.flags.owndata  # a view of the message's bytes
    short = Array(np.ones(1000, dtype=np.float32))
    short.data = short.data[:-8]
    with pytest.raises(ValueError):
        wire.view(short)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = Array(dtype="object", shape=(1,), stype=wire.NUMPY, data=buffer.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        wire.view(pickled)
