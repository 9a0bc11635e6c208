"""A site's side of update compression (:mod:`flowerbed.compression`).

The site reads the model the coordinator broadcast (the whole model, or int8's change from the model
it holds), keeps that model (the "view") and, under int8, what its own rounding lost (the residual),
in its work folder (``compression/``, one file per run, 0600): each task is a process of its own.
After training it sends the change from the view, compressed; the residual goes into the next round.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from flowerbed import compression as codec
from flowerbed.certs.files import write_private
from flowerbed.clientapp.data import DataError
from flowerbed.protocol import COMPRESSION_DIR_KEY


def folder_of(node_config: dict[str, object]) -> Path:
    """Where this site keeps its views and residuals (its SuperNode's node config)."""
    value = node_config.get(COMPRESSION_DIR_KEY)
    if not value:
        raise DataError("this SuperNode has no folder for compression state: restart it with `flowerbed supernode "
                        "start` of this flowerbed version")  # fmt: skip
    return Path(str(value))


def _path(folder: Path, run_id: int, what: str) -> Path:
    return folder / f"run-{run_id}.{what}.npz"


def _save(path: Path, state: codec.State) -> None:
    buffer = io.BytesIO()
    arrays: dict[str, np.ndarray] = {f"t{i}": v for i, v in enumerate(state.values())}
    arrays["names"] = np.array(list(state))
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # whole or not at all: a torn view is refused, never used
    write_private(tmp, buffer.getvalue(), overwrite=True)
    tmp.replace(path)


def _load(path: Path) -> codec.State | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            return {name: data[f"t{i}"] for i, name in enumerate(names)}
    except (OSError, ValueError, KeyError):
        return None


def receive(arrays: ArrayRecord, record: ConfigRecord, like: codec.State, folder: Path, run_id: int) -> codec.State:
    """The model to train from: the broadcast decoded (onto the view held, for int8's change). Kept as
    this run's view. ``like``: the task's model state (names, dtypes, shapes)."""
    of, kind = str(record.get("of", "")), str(record.get("kind", ""))
    if of == codec.DELTA:
        held = _load(_path(folder, run_id, "view"))
        if held is None or codec.digest(held) != record.get("base"):
            raise DataError("the round's model came as a change from a model this site does not hold (compression "
                            "= int8): it gets the whole model next round")  # fmt: skip
        view = codec.apply(held, codec.decode(arrays, held))
    else:
        view = codec.decode(arrays, like)
    if record.get("view") and codec.digest(view) != record.get("view"):
        raise DataError("the round's model did not decode to the coordinator's (compression): it gets the whole "
                        "model next round")  # fmt: skip
    if kind == "int8":
        _save(_path(folder, run_id, "view"), view)
    return view


def reply(
    trained: codec.State, view: codec.State, kind: str, folder: Path, run_id: int
) -> tuple[ArrayRecord, ConfigRecord]:
    """The change from ``view`` compressed as ``kind`` (int8: with this run's residual, which is kept)."""
    residual = _load(_path(folder, run_id, "residual")) if kind == "int8" else None
    record, left = codec.encode(codec.difference(trained, view), kind, residual)
    if kind == "int8":
        _save(_path(folder, run_id, "residual"), left)
    return record, codec.config(kind, codec.DELTA, base=codec.digest(view))
