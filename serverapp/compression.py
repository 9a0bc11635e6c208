"""The coordinator's side of update compression (:mod:`flowerbed.compression`).

Before a round, :meth:`Broadcast.prepare` puts the global model into each train message in the
run's form and returns the model the sites will hold (the "view"); after it, :meth:`Broadcast.decode`
turns each site's compressed change back into that site's model (view + change), so the round
screens and aggregates models exactly as without compression. Which sites hold the view is known
from their replies: a site whose compressed reply was read holds it; any other gets the whole model.
A coordinator that restarts holds no view: its first round sends the whole model to every site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, Message, RecordDict

from flowerbed import compression as codec

ARRAYS = "arrays"  # the record Flower's strategies put the model in (their ``arrayrecord_key``)


@dataclass
class Broadcast:
    """What the coordinator keeps between rounds of a compressed run."""

    kind: str
    fp32: bool = False  # broadcast_fp32: the model goes out in fp32, the sites' changes still compressed
    view: codec.State | None = None  # the model the holders hold
    holders: set[int] = field(default_factory=set)
    residual: codec.State = field(default_factory=dict)  # int8: what the broadcast's rounding lost so far
    base: str = ""  # the digest of the view the sites' changes are made from (set by prepare)

    def prepare(self, messages: list[Message], arrays: ArrayRecord) -> codec.State:
        """Each message's model in the run's form (messages sharing content keep sharing it); the view."""
        model = codec.state_of(arrays)
        if self.kind == "fp16" and not self.fp32:
            record, _ = codec.encode(model, "fp16")
            view = codec.decode(record, model)
            digest = codec.digest(view)
            forms = {False: (record, codec.config(self.kind, codec.MODEL, view=digest))}
        elif self.fp32 or self.view is None:  # the model as it is (int8: nothing held yet)
            view, digest = model, codec.digest(model)
            forms = {False: (arrays, codec.config(self.kind, codec.MODEL, view=digest))}
        else:  # int8: the change from what the holders hold (self.base is its digest), the whole view to the others
            record, self.residual = codec.encode(codec.difference(model, self.view), "int8", self.residual)
            view = codec.apply(self.view, codec.decode(record, self.view))
            digest = codec.digest(view)
            full = ArrayRecord({name: Array(value) for name, value in view.items()})
            forms = {True: (record, codec.config(self.kind, codec.DELTA, base=self.base, view=digest)),
                     False: (full, codec.config(self.kind, codec.MODEL, view=digest))}  # fmt: skip
        contents: dict[tuple[int, bool], RecordDict] = {}
        for message in messages:
            holds = message.metadata.dst_node_id in self.holders and True in forms
            key = (id(message.content), holds)
            if key not in contents:
                record, config = forms[holds]
                content = RecordDict({name: rec for name, rec in message.content.items() if name != ARRAYS})
                content[ARRAYS] = record
                content[codec.RECORD] = config
                contents[key] = content
            message.content = contents[key]
        self.view, self.base, self.holders = view, digest, set()
        return view

    def decode(self, replies: list[Message]) -> None:
        """Each compressed reply's change applied to the view, in place; the holders for the next round."""
        self.holders = set()
        for reply in replies:
            self.decode_one(reply)

    def decode_one(self, reply: Message) -> Message:
        """One reply's change applied to the view, in place, as it arrives (a reply that cannot be read loses
        its model: the round names it); its site becomes a holder. Call :meth:`prepare` first, which starts
        the round's holders afresh."""
        if self.view is None or reply.has_error() or codec.RECORD not in reply.content.config_records:
            return reply  # nothing was prepared (nothing can be read), or nothing compressed came
        record = reply.content.config_records[codec.RECORD]
        arrays = reply.content.array_records.get(ARRAYS)
        try:
            if arrays is None or record.get("of") != codec.DELTA or record.get("base") != self.base:
                raise ValueError("not a change from this round's view")
            model = codec.apply(self.view, codec.decode(arrays, self.view))
        except ValueError:
            reply.content = RecordDict({k: v for k, v in reply.content.items() if k != ARRAYS})
            return reply
        reply.content[ARRAYS] = ArrayRecord({name: Array(value) for name, value in model.items()})
        self.holders.add(reply.metadata.src_node_id)
        return reply
