"""Sign a crashed SuperNode off at the SuperLink, so that its restart is not refused for a minute.

A SuperNode that ends cleanly (SIGTERM, Ctrl-C) sends ``DeactivateNode`` itself. One that was
killed (kill -9, out of memory, a crash) does not: the SuperLink keeps its session online for two
heartbeat intervals (about 60 s) and refuses the restarted node ("Failed to activate SuperNode").
The supervisor sends that same request in its place, signed with the node's own key, through
Flower's own Fleet HTTP client (the gateway, TLS, the site's proxy settings, node authentication),
so the restart is accepted at once.

This uses flwr's internal client classes (``flwr.supernode.fleet_http_client``), which is why
flowerbed pins ``flwr>=1.42,<1.43`` and tests this against real processes.
"""

from __future__ import annotations

from pathlib import Path

from flowerbed.certs.nodekeys import load_private_key


def sign_off(superlink: str, ca: Path, key: Path, node_id: int) -> str | None:
    """Deactivate ``node_id`` at the SuperLink; None on success, else why it did not work."""
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key = load_private_key(key)
    try:
        with FleetHttpClient.from_server_address(
            superlink,
            False,
            ca.read_bytes(),  # as an SSL context (a path string is deprecated in httpx)
            interceptors=[NodeAuthHttpInterceptor(private_key, private_key.public_key())],
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except httpx.HTTPStatusError as exc:
        return f"HTTP {exc.response.status_code} {exc.response.text[:200]}"
    except (httpx.HTTPError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None
