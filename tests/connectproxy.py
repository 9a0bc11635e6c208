"""A minimal HTTP CONNECT proxy on loopback (stands in for a site's forward proxy)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _pipe(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
    for _ in range(100_000):  # bounded
        if stop.is_set():
            return
        ready, _, _ = select.select([a, b], [], [], 0.2)
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            (b if sock is a else a).sendall(data)


@contextmanager
def connect_proxy(port: int = 0) -> Iterator[tuple[int, list[str]]]:
    """Yield (port, targets seen); only loopback targets are tunnelled. ``port`` 0: any free port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()
    seen: list[str] = []

    def handle(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = conn.recv(1024)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ")[1].decode()
            seen.append(target)
            host, port = target.rsplit(":", 1)
            if host not in ("localhost", "127.0.0.1"):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            try:
                upstream = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            with upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(conn, upstream, stop)

    def serve() -> None:
        for _ in range(10_000):
            if stop.is_set():
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1]), seen
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
