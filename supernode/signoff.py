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


def is_registered(superlink: str, ca: Path, key: Path) -> bool | None:
    """Whether the SuperLink knows this node key; None when the probe got no clear answer.

    Flower answers every refused activation alike ("Failed to activate SuperNode"), whether the key
    is unknown or its previous session is still online. An activation with an out-of-range
    heartbeat interval tells them apart without side effects: Flower looks the key up first (an
    unknown key: 412, activation failed) and checks the interval next (a known key: 400, invalid
    heartbeat interval), and activates nothing in either case (flwr 1.42, ``activate_node``).
    """
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key = load_private_key(key)
    public_key = private_key.public_key()
    try:
        with FleetHttpClient.from_server_address(
            superlink, False, ca.read_bytes(), interceptors=[NodeAuthHttpInterceptor(private_key, public_key)]
        ) as client:
            client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(public_key), heartbeat_interval=-1))
    except httpx.HTTPStatusError as exc:
        return {400: True, 412: False}.get(exc.response.status_code)
    except (httpx.HTTPError, OSError):
        return None
    return None  # activated with an invalid interval: not what flwr 1.42 does
