"""A slow link for one site: a TCP relay that delays every byte by a fixed time, each way, and may cap
the bandwidth (each way, shared by all the relay's connections: one link).

This machine's kernel has no ``netem`` qdisc (``tc qdisc add ... netem`` answers "Specified qdisc
kind is unknown"), so the fault suite makes latency with this relay, run inside the site's own
namespace in front of the gateway, and packet loss with an nftables ``numgen random`` drop rule on
the site's link. Run as ``python -m tests.hosts.slowlink LISTEN_HOST LISTEN_PORT TARGET_HOST
TARGET_PORT DELAY_MS [MBIT_S]``; it runs until it is stopped. The WAN benchmark (benchmarks/wan.py)
chains them: a site's link (100 Mbit/s, 30 ms) into the coordinator's (1 Gbit/s).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

CHUNK = 65536


@dataclass
class Link:
    """One direction of the link: bytes per second (0: no cap), and when it is free to send again."""

    rate: float = 0.0
    free_at: float = 0.0

    def slot(self, now: float, size: int) -> float:
        """When ``size`` bytes ready at ``now`` may go out: after the bytes before them, at the cap."""
        if self.rate <= 0:
            return now
        start = max(now, self.free_at)
        self.free_at = start + size / self.rate
        return self.free_at


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, link: Link) -> None:
    """Forward what ``reader`` gives, each chunk ``delay_s`` after it arrived and no faster than ``link``."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            due = link.slot(max(due, loop.time()), len(data))
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((loop.time() + delay_s, data))
            if not data:
                break
    except (ConnectionError, OSError):
        await queue.put((loop.time(), b""))
    await sender


async def _serve(listen: str, port: int, target: str, target_port: int, delay_s: float, *, mbit_s: float = 0) -> None:
    up, down = Link(mbit_s * 1e6 / 8), Link(mbit_s * 1e6 / 8)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pump(client_r, server_w, delay_s, up), _pump(server_r, client_w, delay_s, down), return_exceptions=True
        )

    server = await asyncio.start_server(handle, listen, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen, port, target, target_port, delay_ms, *cap = argv
    asyncio.run(
        _serve(listen, int(port), target, int(target_port), float(delay_ms) / 1000, mbit_s=float(cap[0]) if cap else 0)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
