"""A node that leaves while a round is configured never hangs the round.

Flower 1.42's strategies read the connected nodes twice: once for the sample size, once in
``sample_nodes``, which waits without end until that many nodes are connected. A site revoked (or
gone) between the two reads hung the run (found by the revoke-mid-round test). The round loop hands
the strategy one snapshot of the node list; here a grid loses a node after its first read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flowerbed.serverapp.loop import NodeSnapshot


class LeavingGrid(Grid):
    """Two nodes connected; the second one is gone from the second read on."""

    def __init__(self) -> None:
        self.reads = 0

    def get_node_ids(self) -> Iterable[int]:
        self.reads += 1
        return [1, 2] if self.reads == 1 else [1]

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError


def _sample(grid: Grid) -> list[int]:
    """What FedAvg's configure_train and configure_evaluate do before they build the messages."""
    sample_size = max(len(list(grid.get_node_ids())), 2)
    node_ids, _ = sample_nodes(grid, 2, sample_size)
    return node_ids


def test_a_node_leaving_between_flowers_two_reads_does_not_hang_the_round() -> None:
    grid = LeavingGrid()
    snapshot = NodeSnapshot(grid)
    got: list[list[int]] = []
    worker = threading.Thread(target=lambda: got.append(_sample(snapshot.grid())), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the strategy waited for a node that had left"
    assert sorted(got[0]) == [1, 2]  # the exchange then names the one that left
    assert grid.reads == 1
    assert list(grid.get_node_ids()) == [1]  # the grid itself lost it
