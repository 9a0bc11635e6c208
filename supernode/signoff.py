"""Sign a crashed SuperNode off at the SuperLink, so that its restart is not refused for a minute.

A SuperNode that ends cleanly (SIGTERM, Ctrl-C) sends ``DeactivateNode`` itself. One that was
killed (kill -9, out of memory, a crash) does not: the SuperLink keeps its session online for two
heartbeat intervals (about 60 s) and refuses the restarted node ("Failed to activate SuperNode").
The supervisor sends that same request in its place, signed with the node's own key, through
Flower's own Fleet HTTP client (the gateway, TLS, the site's proxy settings, node authentication),
so the restart is accepted at once.

Flower's internal client classes are reached through :mod:`flowerbed.flower.supernode` (a missing
one raises HookError, naming the Flower version); tests run this against real processes.
"""

from __future__ import annotations

from pathlib import Path

from flowerbed.certs.nodekeys import load_private_key
from flowerbed.flower import HookError, supernode


def sign_off(superlink: str, ca: Path, key: Path, node_id: int) -> str | None:
    """Deactivate ``node_id`` at the SuperLink; None on success, else why it did not work."""
    import httpx

    private_key = load_private_key(key)
    try:
        # the CA as bytes: an SSL context (a path string is deprecated in httpx)
        with supernode.fleet_client(superlink, ca.read_bytes(), private_key) as client:
            supernode.deactivate_node(client, node_id)
    except HookError as exc:
        return exc.message
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

    private_key = load_private_key(key)
    try:
        with supernode.fleet_client(superlink, ca.read_bytes(), private_key) as client:
            supernode.activate_node(client, private_key.public_key(), heartbeat_interval=-1)
    except HookError:
        return None
    except httpx.HTTPStatusError as exc:
        return {400: True, 412: False}.get(exc.response.status_code)
    except (httpx.HTTPError, OSError):
        return None
    return None  # activated with an invalid interval: not what flwr 1.42 does
