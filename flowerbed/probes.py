"""Readiness probes: gRPC health, TCP connect, and a TLS handshake that must present our certificate."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_CHANNELS: dict[str, grpc.Channel] = {}


def grpc_health(address: str, timeout_s: float = 1.0) -> bool:
    """True when the gRPC health service at ``address`` answers SERVING (Flower's --health-server-address).

    One channel per address for the life of the process, never closed: gRPC Python can deadlock the
    whole process (GIL against its shutdown thread) when a channel is closed while an exception, such
    as a signal's, interrupted a call (grpc/grpc#19973, #42247); a supervisor probes every second.
    """
    channel = _CHANNELS.get(address)
    if channel is None:
        # A probe before the server is up must not push the next tries back (gRPC's default backoff
        # grows to 120 s): reconnect within half a second.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]  # fmt: skip
        channel = _CHANNELS[address] = grpc.insecure_channel(address, options=options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (held together while chosen, so never equal)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def presents_certificate(host: str, port: int, ca: Path, cert_der: bytes, timeout_s: float = 2.0) -> bool:
    """True when ``host:port`` completes a TLS handshake with exactly ``cert_der`` (verified by ``ca``).

    A bare TCP probe would be answered by any other process that holds the port.
    """
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the listener is probed by address; the certificate itself is compared
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            return tls.getpeercert(binary_form=True) == cert_der
    except (OSError, ssl.SSLError):
        return False
