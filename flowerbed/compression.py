"""Update compression that sites and coordinator agree on: ``compression = "none" | "fp16" | "int8"``.

A site sends the change of its model (trained minus the model it received), not the model:

- ``fp16``: each float tensor's change in half precision (2 bytes a value);
- ``int8``: each float tensor's change as int8 with a float32 scale per row (per tensor for 1-D
  tensors and rows under ``ROW_MIN`` values), 1 byte a value; what the rounding lost is kept at the
  site and added to the next round's change (error feedback), so it is sent later, not lost.

The coordinator broadcasts the global model in the same form: ``fp16`` as the model in half
precision; ``int8`` as the change from the model the sites hold (the "view" both sides keep, with
the coordinator's own error feedback), in full to a site that did not take the previous round.
``broadcast_fp32`` sends the model in fp32 instead. Integer tensors (counters) travel as they are.

Everything here works on numpy arrays keyed by tensor name (a state dict's order); the records are
Flower's ArrayRecord and ConfigRecord, so :mod:`flowerbed.wire` packs them like any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

KINDS = ("none", "fp16", "int8")
RECORD = "compression"  # a message's ConfigRecord: kind, "of" (delta or model), base and view digests
SCALE = "@scale"  # the key suffix of an int8 tensor's scales
DELTA, MODEL = "delta", "model"

State = dict[str, np.ndarray]


def is_float(array: np.ndarray) -> bool:
    """Whether a tensor is compressed (floats) or sent as it is (integer counters, flags)."""
    return bool(np.issubdtype(array.dtype, np.floating))


def digest(state: Mapping[str, np.ndarray]) -> str:
    """A short sha256 of a state (names, dtypes, shapes, values): which view a delta applies to."""
    h = hashlib.sha256()
    for name, array in state.items():
        h.update(name.encode())
        h.update(str(array.dtype).encode())
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


ROW_MIN = 64  # a scale per row for rows at least this long; else one per tensor (4 bytes per short row cost too much)


def _rows(array: np.ndarray) -> np.ndarray:
    per_row = array.ndim >= 2 and array.shape[0] > 0 and array.size // array.shape[0] >= ROW_MIN
    return array.reshape(array.shape[0], -1) if per_row else array.reshape(1, -1)


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales (per row of ROW_MIN values or more, else one per tensor) with values
    ~ q * scale."""
    rows = _rows(values.astype(np.float32))
    peak = np.abs(rows).max(axis=1, keepdims=True) if rows.size else np.zeros((rows.shape[0], 1), np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
    return q.reshape(values.shape), scale.reshape(-1)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 values :func:`quantize` stands for."""
    rows = q.astype(np.float32).reshape(max(scale.size, 1), -1)
    values: np.ndarray = (rows * scale.reshape(-1, 1)).reshape(q.shape).astype(np.float32)
    return values


def encode(
    values: Mapping[str, np.ndarray], kind: str, residual: Mapping[str, np.ndarray] | None = None
) -> tuple[ArrayRecord, State]:
    """``values`` (a change or a model) as ``kind``, and the new residual (int8: what the rounding lost,
    ``residual`` included; fp16 keeps none)."""
    arrays: dict[str, Array] = {}
    left: State = {}
    for name, value in values.items():
        if not is_float(value):
            arrays[name] = Array(np.ascontiguousarray(value))
            continue
        if kind == "fp16":
            arrays[name] = Array(value.astype(np.float16))
            continue
        carried = value.astype(np.float32) + (residual[name] if residual and name in residual else 0.0)
        q, scale = quantize(carried)
        arrays[name] = Array(q)
        arrays[name + SCALE] = Array(scale)
        left[name] = carried - dequantize(q, scale)
    return ArrayRecord(arrays), left


def decode(record: ArrayRecord, like: Mapping[str, np.ndarray]) -> State:
    """The float32 values of an :func:`encode` record, in the order and dtypes of ``like`` (integer
    tensors as they came)."""
    out: State = {}
    for name, reference in like.items():
        if name not in record:
            raise ValueError(f"tensor {name!r} is missing from the compressed record")
        value = record[name].numpy()
        if value.shape != reference.shape and value.size == reference.size:  # a 0-d tensor comes back as (1,)
            value = value.reshape(reference.shape)
        if not is_float(reference):
            out[name] = value.astype(reference.dtype)
        elif value.dtype == np.int8:
            if name + SCALE not in record:
                raise ValueError(f"tensor {name!r} has no scales")
            out[name] = dequantize(value, record[name + SCALE].numpy())
        else:
            out[name] = value.astype(np.float32)
        if out[name].shape != reference.shape:
            raise ValueError(f"tensor {name!r} has shape {out[name].shape}, the model's is {reference.shape}")
    return out


def apply(base: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]) -> State:
    """``base + change`` for float tensors; integer tensors take the change's value (they are sent whole)."""
    return {name: (value + change[name]).astype(value.dtype) if is_float(value) else change[name]
            for name, value in base.items()}  # fmt: skip


def difference(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> State:
    """``new - base`` for float tensors; integer tensors as ``new`` holds them."""
    return {name: (value.astype(np.float32) - base[name].astype(np.float32)) if is_float(value) else value
            for name, value in new.items()}  # fmt: skip


def state_of(record: ArrayRecord) -> State:
    """An ArrayRecord as numpy arrays by name."""
    return {name: array.numpy() for name, array in record.items()}


def config(kind: str, of: str, *, base: str = "", view: str = "") -> ConfigRecord:
    """The message's compression record: the codec, whether it holds a delta or a model, and digests."""
    return ConfigRecord({"kind": kind, "of": of, "base": base, "view": view})


def nbytes(record: ArrayRecord) -> int:
    """The bytes of a record's arrays (what the codec saves is measured on this)."""
    return sum(len(array.data) for array in record.values())
