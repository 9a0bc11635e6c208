"""Flower's array inflation, in one copy: every process that reads large messages (ServerApp, ClientApp).

- ``Array.inflate`` (``flwr.app``): Flower joins an array's 5 MiB chunks into a growing ``bytearray``
  and then copies that into ``bytes``, while the chunks are still held: three copies of the array at
  once (300 MB for a 100 MB reply at the ServerApp). The kit's inflate runs Flower's own on stand-in
  chunks whose bytes name their place (8 bytes each, so Flower still checks the chunk ids against the
  array's head and puts them in its order), then joins the real chunks in that order in one copy: two
  copies at once, and the same bytes (``bytes``: Flower's ArrayRecord takes no other buffer, so a
  buffer filled chunk by chunk, each chunk let go once copied, would need a last copy all the same).
- ``ArrayChunk`` (``flwr.app.message.arraychunk``): the stand-ins.
"""

from __future__ import annotations

import struct
from typing import Any

from flowerbed.flower import declare, module, resolve, trace

# Not on every federation's path: a small model's message travels packed in a config record, with no array to
# inflate (tests/test_flower_hooks.py runs the hook on Flower's own inflation; test_big_model on a 60 MB model).
ARRAY_INFLATE = declare(
    "flwr.app", "Array.inflate", "read a large array in one copy", "object_content", "children", path=False
)
ARRAY_CHUNK = declare("flwr.app.message.arraychunk", "ArrayChunk", "read a large array in one copy", "data", path=False)
_PLACE = struct.Struct("<Q")


def inflate_arrays_in_one_copy() -> None:
    """From now on, this process inflates each of Flower's arrays in one copy of its chunks (see above)."""
    cls = module(ARRAY_INFLATE)  # flwr.app.Array
    original = resolve(ARRAY_INFLATE)
    chunk = resolve(ARRAY_CHUNK)
    if getattr(original, "_flowerbed", False):
        return  # installed already (a warm parent, then its fork)

    def inflate(klass: Any, object_content: bytes, children: dict[str, Any] | None = None) -> Any:
        trace(ARRAY_INFLATE)
        if not children or len(children) < 2:  # one chunk: Flower's own makes no copy worth saving
            return original(object_content, children=children)
        ids = list(children)
        stand_ins = {object_id: chunk(memoryview(_PLACE.pack(i))) for i, object_id in enumerate(ids)}
        array = original(object_content, children=stand_ins)
        places = [i for (i,) in _PLACE.iter_unpack(array.data)]
        array.data = b"".join(children[ids[i]].data for i in places)
        return array

    inflate._flowerbed = True  # type: ignore[attr-defined]
    cls.inflate = classmethod(inflate)
