"""A kit message as one flat array: fewer objects, so fewer requests per round.

Flower 1.42 sends a message as a tree of objects and moves each with a request of its own (TLS
through the gateway, a signed node request, an SQLite write at the SuperLink): the message, its
record dict, each record, each array and each of its 5 MiB chunks. The demo's update of four
tensors was 13 pushes; a model of 300 tensors is over 600. :func:`pack` turns a message's content
into one record holding one blob: a manifest of what was in it (records in order; each array's key,
dtype, shape and Flower serialization; config and metric values, their bytes values in the blob)
followed by the arrays' bytes; :func:`unpack` gives the same content back. A blob of up to
``INLINE_MAX`` travels as a bytes value of a ConfigRecord (which has no child objects: a message is
3 objects), a larger one as one array (4 objects plus one per 5 MiB chunk), whatever the number of
tensors. A blob of up to ``DEFLATE_MAX`` is deflated (zlib) when that saves a twentieth: a small
model's manifest, metric names and int8 codes are a good part of its bytes; reading one refuses a
blob that would inflate beyond ``INFLATE_MAX``.

The kit's ServerApp packs what it sends in :func:`flowerbed.serverapp.loop.exchange` and unpacks
the replies there; the kit's ClientApp unpacks in its outermost mod (:func:`packing_mod`, before
SecAgg+'s mod and the handlers) and packs its reply the same way when the message came packed.
Nothing else changes: the strategies, DP-SGD, SecAgg+ and CKKS see Flower's records as before.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from numpy.lib import format as npy_format

FLAT_ENV = "FLOWERBED_FLAT_MESSAGES"  # "0": the ServerApp sends Flower's object trees (benchmarks compare)
PACKED = "flowerbed-packed"  # the one record of a packed message's content; its one value (or array) is BLOB
BLOB = "blob"
INLINE_MAX = 4 * 2**20  # below Flower's 5 MiB chunks: no request grows larger than Flower's own
MAGIC = b"FBWIRE1\n"
DEFLATED = b"FBWIREZ\n"  # the same blob after its magic, deflated (zlib)
DEFLATE_MAX = 2**20  # blobs up to 1 MiB are deflated when that saves DEFLATE_GAIN: bytes count there, CPU does not
DEFLATE_GAIN = 0.05
INFLATE_MAX = 4 * DEFLATE_MAX  # what a deflated blob may grow to when read: a zip bomb is refused
STYPE = "flowerbed.wire"  # the blob's Flower serialization type: bytes, not a numpy array
NUMPY = "numpy.ndarray"  # Flower's serialization type of a numpy (and torch) array: np.save's bytes
_LENGTH = struct.Struct("<Q")


class WireError(ValueError):
    """A packed message that cannot be read (torn, or made by another kit version)."""


def enabled() -> bool:
    """Whether the ServerApp packs what it sends (``FLOWERBED_FLAT_MESSAGES``, on unless "0")."""
    return os.environ.get(FLAT_ENV, "1") != "0"


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` is :func:`pack`'s output."""
    return list(content.keys()) == [PACKED] and isinstance(content[PACKED], ArrayRecord | ConfigRecord)


def _value(value: Any, blobs: list[bytes], offset: list[int]) -> Any:
    """A config or metric value for the manifest: bytes go to the blob, as [offset, size]."""
    if isinstance(value, bytes):
        at = offset[0]
        blobs.append(value)
        offset[0] += len(value)
        return {"b": [at, len(value)]}
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return {"bl": [_value(v, blobs, offset)["b"] for v in value]}
    return {"v": value}


def _raw(array: Array) -> tuple[bytes, dict[str, Any]]:
    """An array's bytes for the blob: a numpy array's values without np.save's header (about 128 bytes an
    array, as much as a small tensor), with what makes it again; any other array as Flower holds it."""
    if array.stype == NUMPY:
        value = array.numpy()
        if value.dtype.kind in "biuf" and value.flags.c_contiguous:
            return value.tobytes(), {"npy": value.dtype.str, "npy_shape": list(value.shape)}
    return array.data, {}


def _restore(item: dict[str, Any], data: memoryview) -> Any:
    if "b" in item:
        at, size = item["b"]
        return bytes(data[at : at + size])
    if "bl" in item:
        return [bytes(data[at : at + size]) for at, size in item["bl"]]
    return item["v"]


def pack(content: RecordDict) -> RecordDict:
    """``content`` as one ArrayRecord holding one byte array (manifest, then every array's bytes)."""
    blobs: list[bytes] = []
    offset = [0]
    records: list[dict[str, Any]] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = []
            for key, array in record.items():
                data, raw = _raw(array)
                arrays.append({"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype,
                               "at": offset[0], "size": len(data), **raw})  # fmt: skip
                blobs.append(data)
                offset[0] += len(data)
            records.append({"name": name, "kind": "arrays", "arrays": arrays})
        else:
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            values = {key: _value(value, blobs, offset) for key, value in record.items()}
            records.append({"name": name, "kind": kind, "values": values})
    manifest = json.dumps({"records": records}, separators=(",", ":")).encode()
    blob = _deflate(b"".join([MAGIC, _LENGTH.pack(len(manifest)), manifest, *blobs]))
    if len(blob) <= INLINE_MAX:
        return RecordDict({PACKED: ConfigRecord({BLOB: blob})})
    return RecordDict({PACKED: ArrayRecord({BLOB: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})})


def _deflate(blob: bytes) -> bytes:
    """A small blob deflated when that saves at least DEFLATE_GAIN (a small model's manifest, metric names and
    int8 codes compress; fp32 values hardly do); a large one as it is (zlib would cost more CPU than it saves)."""
    if len(blob) > DEFLATE_MAX:
        return blob
    deflated = DEFLATED + zlib.compress(blob[len(MAGIC) :], 6)
    return deflated if len(deflated) <= (1 - DEFLATE_GAIN) * len(blob) else blob


def _inflate(raw: bytes) -> bytes:
    """A deflated blob as :func:`pack` made it before deflating; a blob that is not deflated as it is."""
    if raw[: len(DEFLATED)] != DEFLATED:
        return raw
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(raw[len(DEFLATED) :], INFLATE_MAX + 1)
    except zlib.error as exc:
        raise WireError(f"a packed message is cut short or corrupt: {exc}") from None
    if len(body) > INFLATE_MAX or inflater.unconsumed_tail:
        raise WireError(f"a packed message inflates beyond {INFLATE_MAX} bytes: refused")
    if not inflater.eof:
        raise WireError("a packed message is cut short: its deflated stream ends early")
    return MAGIC + body


def unpack(content: RecordDict) -> RecordDict:
    """The content :func:`pack` was given; content that is not packed comes back as it is."""
    if not is_packed(content):
        return content
    raw = _blob(content[PACKED])
    if raw is None:
        raise WireError("a packed message without its blob: sent by another flowerbed version?")
    blob = memoryview(_inflate(raw))
    head = len(MAGIC) + _LENGTH.size
    if bytes(blob[: len(MAGIC)]) != MAGIC or len(blob) < head:
        raise WireError("a packed message of an unknown format: sent by another flowerbed version?")
    (length,) = _LENGTH.unpack(blob[len(MAGIC) : head])
    try:
        manifest = json.loads(bytes(blob[head : head + length]))
    except ValueError as exc:
        raise WireError(f"a packed message's manifest cannot be read: {exc}") from None
    data = blob[head + length :]
    out = RecordDict()
    for item in manifest["records"]:
        if item["kind"] == "arrays":
            arrays = {}
            for a in item["arrays"]:
                if a["at"] + a["size"] > len(data):
                    raise WireError(f"a packed message is cut short in array {a['key']!r}")
                chunk = data[a["at"] : a["at"] + a["size"]]
                if "npy" in a:  # numpy's own bytes without np.save's header: Flower's Array made again from them
                    arrays[a["key"]] = _npy(a, chunk)
                else:
                    arrays[a["key"]] = Array(dtype=a["dtype"], shape=tuple(a["shape"]), stype=a["stype"],
                                             data=bytes(chunk))  # fmt: skip
            out[item["name"]] = ArrayRecord(arrays)
        else:
            values = {key: _restore(value, data) for key, value in item["values"].items()}
            out[item["name"]] = MetricRecord(values) if item["kind"] == "metrics" else ConfigRecord(values)
    return out


def _npy(item: dict[str, Any], chunk: memoryview) -> Array:
    """The Flower Array ``Array(ndarray)`` makes of the numpy array whose values ``chunk`` holds: np.save's header
    made again, then the values, in one copy (not the array copied and saved again through a growing buffer)."""
    try:
        view = np.frombuffer(chunk, dtype=np.dtype(item["npy"])).reshape(item["npy_shape"])
    except (TypeError, ValueError) as exc:
        raise WireError(f"a packed message's array {item['key']!r} does not match its shape: {exc}") from None
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(view))
    return Array(dtype=str(view.dtype), shape=tuple(view.shape), stype=NUMPY, data=b"".join([header.getvalue(), chunk]))


def view(array: Array) -> np.ndarray:
    """A read-only numpy view of a Flower array's np.save bytes, without the copy ``Array.numpy()`` makes (a 100 MB
    update is read where it lies). Its header is read by numpy's own reader, as ``np.load`` reads it; an array
    of Python objects, bytes that do not hold its shape, or an array that is not numpy's raise as Flower would."""
    if array.stype != NUMPY:
        return array.numpy()  # raises: not numpy's bytes
    head = io.BytesIO(array.data)  # shares the bytes (no copy)
    version = npy_format.read_magic(head)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject:
        return array.numpy()  # raises: np.load refuses pickled objects
    count = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=head.tell())  # ValueError when short
    return values.reshape(shape[::-1]).T if fortran else values.reshape(shape)


def _blob(record: Any) -> bytes | None:
    if isinstance(record, ConfigRecord):
        value = record.get(BLOB)
        return value if isinstance(value, bytes) else None
    if isinstance(record, ArrayRecord) and BLOB in record and record[BLOB].stype == STYPE:
        return record[BLOB].data
    return None


def size(content: RecordDict) -> int:
    """The bytes of a packed content's blob (0 for content that is not packed)."""
    if not is_packed(content):
        return 0
    raw = _blob(content[PACKED])
    return len(raw) if raw is not None else 0


def pack_message(message: Message) -> Message:
    """``message`` with its content packed (in place; errors stay as they are)."""
    if message.has_content() and not is_packed(message.content):
        message.content = pack(message.content)
    return message


def unpack_message(message: Message) -> Message:
    """``message`` with its content unpacked (in place); content that cannot be read is left out (the
    round then names the site's reply as one without a model or metrics)."""
    if message.has_content() and is_packed(message.content):
        try:
            message.content = unpack(message.content)
        except WireError:
            message.content = RecordDict()
    return message


def packing_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp's outermost mod: a packed message is unpacked for everything inside, its reply packed."""
    if not msg.has_content() or not is_packed(msg.content):
        return call_next(msg, context)
    unpack_message(msg)
    return pack_message(call_next(msg, context))
