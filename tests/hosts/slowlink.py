"""A slow link for one site: a TCP relay that delays every byte by a fixed time, each way.

This machine's kernel has no ``netem`` qdisc (``tc qdisc add ... netem`` answers "Specified qdisc
kind is unknown"), so the fault suite makes latency with this relay, run inside the site's own
namespace in front of the gateway, and packet loss with an nftables ``numgen random`` drop rule on
the site's link. Run as ``python -m tests.hosts.slowlink LISTEN_HOST LISTEN_PORT TARGET_HOST
TARGET_PORT DELAY_MS``; it runs until it is stopped.
"""

from __future__ import annotations

import asyncio
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Forward what ``reader`` gives, each chunk ``delay_s`` after it arrived, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay_s, data))
            if not data:
                break
    except (ConnectionError, OSError):
        await queue.put((loop.time(), b""))
    await sender


async def _serve(listen: str, port: int, target: str, target_port: int, delay_s: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pump(client_r, server_w, delay_s), _pump(server_r, client_w, delay_s), return_exceptions=True
        )

    server = await asyncio.start_server(handle, listen, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen, port, target, target_port, delay_ms = argv
    asyncio.run(_serve(listen, int(port), target, int(target_port), float(delay_ms) / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
