"""A tiny real TLS server on loopback serving a given certificate (for handshake tests)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HTTP_REPLY = b"HTTP/1.1 404 Not Found\r\nDate: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@contextmanager
def tls_server(cert: Path, key: Path, date_header: str | None = None) -> Iterator[int]:
    """Serve TLS on 127.0.0.1:PORT until the block ends; answers one HTTP request per connection."""
    import email.utils

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        for _ in range(10_000):  # bounded
            if stop.is_set():
                return
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    date = date_header or email.utils.formatdate(usegmt=True)
                    tls.sendall(HTTP_REPLY % date.encode())
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
