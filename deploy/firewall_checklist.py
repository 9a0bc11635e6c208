#!/usr/bin/env python3
"""flowerbed firewall allowlist checklist for a site's workspace VM.

Runs with the VM's bare system Python (3.8 or newer) and the standard library only, before any
environment exists. Every row is PASS, FAIL, WARN or INFO with the reason and the fix; the exit
code is 0 only when every required row passes.

    python3 firewall_checklist.py --superlink link.example.org:9092 --ca ca.crt
    python3 firewall_checklist.py --superlink link.example.org:9092 --allowlist   # for the IT ticket
    python3 firewall_checklist.py --superlink link.example.org:9092 --json
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import json
import os
import socket
import ssl
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"
MAX_AHEAD_S = 4.0  # Flower refuses a node more than 5 s ahead of the SuperLink
MAX_BEHIND_S = 300.0
DATA_FILE = Path(__file__).with_name("allowlist.json")
INSTALL_PATHS = ("conda", "pip", "offline")
OS_PACKAGES = ("ubuntu", "none")


class Row:
    """One line of the checklist."""

    def __init__(
        self, check: str, status: str, detail: str, fix: str = "", required: bool = True, *, value: float | None = None
    ) -> None:
        self.check = check
        self.status = status
        self.detail = detail
        self.fix = fix
        self.required = required
        self.value = value  # the measured figure, where there is one (clock skew: seconds ahead)

    @property
    def blocking(self) -> bool:
        """True when the check failed and the SuperNode cannot work without it."""
        return self.required and self.status == FAIL

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready fields (``--json``)."""
        return {
            "check": self.check,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
            "required": self.required,
        }


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` as ``(host, port)``: the kit's one HOST:PORT parser.

    ``default_port`` is used when the port is left out (None: the port is required). Raises
    ValueError, in one line, for a missing host, a port that is not a number in 1-65535, or a
    missing port with no default.
    """
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""  # a bare name, or an IPv6 address without brackets and port
    if not host:
        raise ValueError(f"{value!r} has no host: write HOST:PORT, e.g. link.example.org:9092")
    if not port:
        if default_port is None:
            raise ValueError(f"{value!r} has no port: write HOST:PORT, e.g. link.example.org:9092")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the port of {value!r} is not a number from 1 to 65535")
    return host, int(port)


def find_kit(here: Path | None = None) -> Path | None:
    """The site kit this checklist runs in: its own folder, else the working folder, if it holds site.toml."""
    for folder in (here or Path(__file__).resolve().parent, Path.cwd()):
        if (folder / "site.toml").is_file():
            return folder
    return None


def kit_defaults(kit: Path) -> dict[str, str]:
    """What the kit knows: the gateway (``superlink``), its CA (``ca``) and the install path.

    site.toml is read line by line (the VM's bare Python may be older than tomllib): only the
    ``superlink_address`` and ``superlink_port`` keys the kit builder writes are needed.
    """
    values: dict[str, str] = {}
    for line in (kit / "site.toml").read_text(encoding="utf-8").splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip() in ("superlink_address", "superlink_port"):
            values[key.strip()] = value.strip().strip('"')
    out: dict[str, str] = {}
    if "superlink_address" in values:
        out["superlink"] = f"{values['superlink_address']}:{values.get('superlink_port', '9092')}"
    if (kit / "ca.crt").is_file():
        out["ca"] = str(kit / "ca.crt")
    out["install_path"] = "offline" if any((kit / "wheels").glob("*.whl")) else "conda"
    return out


def load_destinations(path: Path, install_path: str, os_packages: str) -> list[dict[str, Any]]:
    """The destinations for the chosen install path and OS package source, without repeats."""
    data = json.loads(path.read_text(encoding="utf-8"))
    names = [*data["install_paths"][install_path], "os-" + os_packages]
    out: list[dict[str, Any]] = []
    for name in names:
        for dest in data["groups"].get(name, []):
            if all(d["host"] != dest["host"] for d in out):
                out.append(dest)
    return out


# --- proxies -----------------------------------------------------------------------------------


class HopError(OSError):
    """A connection failed at one named hop: ``dns``, ``tcp``, ``proxy`` (unreachable),
    ``proxy-auth`` (the proxy wants credentials) or ``proxy-connect`` (the proxy refused the tunnel)."""

    def __init__(self, hop: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.hop = hop
        self.message = message
        self.fix = fix


class Proxy(NamedTuple):
    """The HTTPS proxy for a host. ``auth`` (``user:password``, percent-decoded) is sent, never shown."""

    host: str
    port: int
    auth: str = ""


def proxy_for(host: str, env: dict[str, str] | None = None) -> Proxy | None:
    """The HTTPS proxy that applies to ``host`` (HTTPS_PROXY minus NO_PROXY), read as urllib, pip and httpx read it.

    Credentials in the URL (``http://USER:PASSWORD@HOST:PORT``, special characters percent-encoded)
    are kept for the proxy's Basic authentication, as httpx (the SuperNode's client) and pip use them.
    """
    if env is None:
        proxies = urllib.request.getproxies_environment()
    else:  # the same rule as getproxies_environment: lower-case names win
        proxies = {k[:-6].lower(): v for k, v in env.items() if k.lower().endswith("_proxy") and k.isupper() and v}
        proxies.update({k[:-6]: v for k, v in env.items() if k.endswith("_proxy") and k.islower() and v})
    proxy = proxies.get("https")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxy or bypass(host, proxies):
        return None
    rest = proxy.split("://", 1)[-1].rstrip("/")
    userinfo, _, hostport = rest.rpartition("@")
    name, port = parse_host_port(hostport, 3128)
    auth = ""
    if userinfo:
        user, _, password = userinfo.partition(":")
        auth = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return Proxy(name, port, auth)


def open_connection(host: str, port: int, timeout: float, proxy: Proxy | None) -> socket.socket:
    """A TCP connection to host:port, through an HTTP CONNECT proxy when one applies.

    Raises :class:`HopError` naming the hop that failed, so that a site's IT admin knows whom to ask.
    """
    if proxy is None:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise HopError("dns", f"{host} does not resolve ({exc.strerror})", f"allow DNS for {host}") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise HopError(
                "tcp", f"cannot connect to {host}:{port} ({reason})", f"allow outbound TCP {port} to {host}"
            ) from None
    where = f"{proxy.host}:{proxy.port}"
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise HopError(
            "proxy",
            f"the proxy {where} (HTTPS_PROXY) is unreachable ({reason})",
            "check HTTPS_PROXY, and that the proxy runs (ask the team that runs it)",
        ) from None
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if proxy.auth:  # Basic authentication, as httpx and curl send it
        request += f"Proxy-Authorization: Basic {base64.b64encode(proxy.auth.encode('utf-8')).decode('ascii')}\r\n"
    request += "\r\n"
    reply = b""
    try:
        sock.sendall(request.encode("ascii"))
        while b"\r\n\r\n" not in reply and len(reply) < 8192:
            chunk = sock.recv(1024)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        sock.close()
        raise HopError("proxy", f"the proxy {where} dropped the connection ({exc})", "ask the proxy's team") from None
    status = reply.split(b"\r\n", 1)[0].decode("latin-1").strip()
    code = status.split(" ")[1] if len(status.split(" ")) > 1 else ""
    if code == "200":
        return sock
    sock.close()
    if code in ("407", "401") and proxy.auth:  # tinyproxy answers a wrong password with 401
        raise HopError(
            "proxy-auth",
            f"the proxy {where} refused the user name or password in HTTPS_PROXY ({code})",
            "check them (percent-encode special characters: @ as %40, : as %3A, / as %2F), or ask IT",
        )
    if code in ("407", "401"):
        raise HopError(
            "proxy-auth",
            f"the proxy {where} wants credentials ({code}) and HTTPS_PROXY has none",
            "put them into HTTPS_PROXY as http://USER:PASSWORD@HOST:PORT, or ask IT for an exemption",
        )
    raise HopError(
        "proxy-connect",
        f"the proxy {where} refused to open a tunnel to {host}:{port} ({status or 'no answer'})",
        f"ask the proxy's team to allow CONNECT to {host}:{port}",
    )


# --- checks ------------------------------------------------------------------------------------


def check_destination(host: str, port: int, why: str, timeout: float) -> list[Row]:
    """DNS resolution and TCP reach of one outbound destination."""
    name = f"{host}:{port}"
    proxy = proxy_for(host)
    rows = []
    try:
        addresses = sorted({str(a[4][0]) for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        rows.append(Row("dns " + host, PASS, ", ".join(addresses[:4])))
    except socket.gaierror as exc:
        if proxy is None:
            return [
                Row(
                    "dns " + host,
                    FAIL,
                    f"does not resolve ({exc.strerror})",
                    f"allow DNS for {host} (or set HTTPS_PROXY if a proxy resolves names)",
                )
            ]
        rows.append(Row("dns " + host, WARN, "does not resolve here; the proxy resolves it", required=False))
    try:
        with open_connection(host, port, timeout, proxy):
            pass
        via = f" via proxy {proxy.host}:{proxy.port}" if proxy else ""
        rows.append(Row("tcp " + name, PASS, f"reachable{via} ({why})"))
    except HopError as exc:
        rows.append(Row(hop_check(exc.hop, host, port), FAIL, f"{exc.message} ({why})", exc.fix))
    return rows


def decode_der(der: bytes) -> dict[str, Any]:
    """Decode a certificate with the ssl module's own parser (no third-party packages)."""
    pem = ssl.DER_cert_to_PEM_cert(der)
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as handle:
        handle.write(pem)
    try:
        return dict(ssl._ssl._test_decode_cert(handle.name))  # type: ignore[attr-defined]
    except (AttributeError, ssl.SSLError, ValueError):
        return {}
    finally:
        Path(handle.name).unlink()


def _names(cert: dict[str, Any]) -> str:
    return ", ".join(value for _kind, value in cert.get("subjectAltName", ())) or "none"


def _issuer(cert: dict[str, Any]) -> str:
    parts = [
        value for rdn in cert.get("issuer", ()) for (key, value) in rdn if key in ("commonName", "organizationName")
    ]
    return ", ".join(parts) or "unknown"


def _days_left(cert: dict[str, Any]) -> int | None:
    if "notAfter" not in cert:
        return None
    return int((ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()) // 86400)


def check_gateway(host: str, port: int, ca: Path | None, timeout: float) -> list[Row]:
    """TCP and TLS to the SuperLink gateway: identity, interception, expiry, clock skew."""
    name = f"gateway {host}:{port}"
    proxy = proxy_for(host)
    via = f" via proxy {proxy.host}:{proxy.port}" if proxy else ""
    try:
        raw = open_connection(host, port, timeout, proxy)
    except HopError as exc:
        fix = exc.fix + (" (and ask the coordinator whether it runs)" if exc.hop == "tcp" else "")
        return [Row(hop_check(exc.hop, host, port, "gateway "), FAIL, exc.message, fix)]
    rows = [Row("tcp " + name, PASS, "reachable" + via)]
    if ca is not None:
        ctx = ssl.create_default_context(cafile=str(ca))
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True) or b""
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = tls.recv(4096).decode("latin-1")
            received = time.time()
    except ssl.SSLCertVerificationError as exc:
        peer = _fetch_unverified(host, port, timeout, proxy)
        early = not_yet_valid(peer, _decode_pem_file(ca) if ca is not None else {}, time.time())
        if early is not None or exc.verify_code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
            return [*rows, clock_behind_row("tls " + name, early, _gateway_clock(host, port, timeout, proxy))]
        if exc.verify_code in (62, 64) or "mismatch" in str(exc.verify_message).lower():
            return [
                *rows,
                Row(
                    "tls " + name,
                    FAIL,
                    f"the gateway's certificate does not name {host!r} (it names: {_names(peer)})",
                    "connect with one of those names, or ask the coordinator to add it (`--san`, then "
                    "`flowerbed certs renew-server`)",
                ),
            ]
        if exc.verify_code == 10:
            return [
                *rows,
                Row(
                    "tls " + name,
                    FAIL,
                    "the gateway's certificate expired on {}".format(peer.get("notAfter", "?")),
                    "ask the coordinator to run `flowerbed certs renew-server`",
                ),
            ]
        return [*rows, explain_untrusted("tls " + name, host, port, ca, peer)]
    except (ssl.SSLError, OSError) as exc:
        return [
            *rows,
            Row(
                "tls " + name,
                FAIL,
                f"TLS handshake failed: {exc}",
                f"check that {host}:{port} is the flowerbed gateway (not a plain-HTTP port)",
            ),
        ]
    cert = decode_der(der)
    left = _days_left(cert)
    days = f"{left} days left" if left is not None else "expiry unknown"
    if ca is not None:
        rows.append(Row("tls " + name, PASS, f"verified against {ca.name}; names: {_names(cert)}; {days}"))
        if left is not None and left < 30:
            rows.append(
                Row(
                    "certificate expiry",
                    WARN,
                    f"the gateway certificate expires in {left} days",
                    "tell the coordinator to run `flowerbed certs server`",
                    required=False,
                )
            )
    else:
        rows.append(
            Row(
                "tls " + name,
                WARN,
                f"handshake works but was not verified (issuer: {_issuer(cert)}; names: {_names(cert)})",
                "pass --ca ca.crt from the site kit to detect TLS interception",
                required=False,
            )
        )
    rows.append(check_clock(head, received))
    return rows


def explain_untrusted(check: str, host: str, port: int, ca: Path | None, peer: dict[str, Any]) -> Row:
    """Why the gateway's certificate is not trusted: a wrong --ca file, another federation, or interception."""
    mine = _decode_pem_file(ca) if ca is not None else {}
    if mine.get("subjectAltName") or (mine and mine.get("subject") == peer.get("subject")):
        return Row(
            check, FAIL,
            f"{ca} is not a CA certificate: it is a server certificate (names: {_names(mine)})",
            "pass the federation CA, ca.crt from the site kit (not server.crt)",
        )  # fmt: skip
    if mine and mine.get("subject") == peer.get("issuer"):
        return Row(
            check, FAIL,
            f"the gateway's certificate names {ca} as its issuer but was signed by another key: "
            "the federation CA was made anew",
            "ask the coordinator for a new site kit",
        )  # fmt: skip
    if "flowerbed" in _issuer(peer).split(", "):
        return Row(
            check, FAIL,
            f"the gateway's certificate comes from another flowerbed federation (issuer: {_issuer(peer)}), not {ca}",
            "check --superlink, or use the ca.crt of the federation that gateway belongs to",
        )  # fmt: skip
    return Row(
        check, FAIL,
        f"TLS interception: something between this VM and {host}:{port} re-signs TLS "
        f"(issuer: {_issuer(peer)}), so the federation CA {ca} cannot verify it",
        f"ask IT to exempt {host}:{port} from TLS inspection",
    )  # fmt: skip


def hop_check(hop: str, host: str, port: int, what: str = "") -> str:
    """The checklist row a failed hop belongs to (``what``: e.g. ``gateway `` before the address)."""
    proxy = proxy_for(host)
    proxy_name = f"{proxy.host}:{proxy.port}" if proxy else "?"
    return {
        "dns": f"dns {host}",
        "tcp": f"tcp {what}{host}:{port}",
        "proxy": f"proxy {proxy_name}",
        "proxy-auth": f"proxy {proxy_name}",
        "proxy-connect": f"proxy tunnel to {what}{host}:{port}",
    }.get(hop, hop)


def _decode_pem_file(path: Path) -> dict[str, Any]:
    try:
        return dict(ssl._ssl._test_decode_cert(str(path)))  # type: ignore[attr-defined]
    except (AttributeError, ssl.SSLError, ValueError, OSError):
        return {}


def _fetch_unverified(host: str, port: int, timeout: float, proxy: Proxy | None) -> dict[str, Any]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with open_connection(host, port, timeout, proxy) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            return decode_der(tls.getpeercert(binary_form=True) or b"")
    except OSError:
        return {}


def not_yet_valid(peer: dict[str, Any], ca: dict[str, Any], now: float) -> str | None:
    """The ``notBefore`` of the gateway's certificate or the CA that lies ahead of ``now``, if one does."""
    for cert in (peer, ca):
        start = cert.get("notBefore")
        if start and ssl.cert_time_to_seconds(start) > now:
            return str(start)
    return None


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"


def _gateway_clock(host: str, port: int, timeout: float, proxy: Proxy | None) -> float | None:
    """Seconds this VM's clock is ahead of the gateway's (its Date header, over unverified TLS); None: unknown."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with open_connection(host, port, timeout, proxy) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head, received = tls.recv(4096).decode("latin-1"), time.time()
    except OSError:
        return None
    return check_clock(head, received).value


def clock_behind_row(check: str, starts: str | None, ahead: float | None) -> Row:
    """A certificate that is not valid yet on this VM's clock: a clock problem, with the offset."""
    valid = f"the gateway's certificate chain is valid from {starts}" if starts else "the certificate is not valid yet"
    if ahead is not None and ahead < 0:
        what = f"this VM's clock is {_span(ahead)} behind the gateway's ({valid} on the gateway's clock)"
    else:
        what = f"this VM's clock says the certificate is not valid yet ({valid}): the clock is behind"
    return Row(check, FAIL, what, "set this VM's clock (NTP); the certificate itself is fine", value=ahead)


def check_clock(head: str, received: float) -> Row:
    """Skew between this VM and the gateway's HTTP Date header, against Flower's asymmetric window."""
    for line in head.split("\r\n"):
        if line.lower().startswith("date:"):
            server = email.utils.parsedate_to_datetime(line[5:].strip()).timestamp()
            ahead = received - server
            if ahead > MAX_AHEAD_S:
                return Row(
                    "clock skew",
                    FAIL,
                    f"this VM is {ahead:.0f} s ahead of the gateway (limit 5 s)",
                    "sync the clock with NTP (Flower refuses nodes ahead of the SuperLink)",
                    value=ahead,
                )
            if -ahead > MAX_BEHIND_S:
                return Row(
                    "clock skew",
                    FAIL,
                    f"this VM is {-ahead:.0f} s behind the gateway (limit 300 s)",
                    "sync the clock with NTP",
                    value=ahead,
                )
            return Row("clock skew", PASS, f"{ahead:+.0f} s against the gateway", value=ahead)
    return Row("clock skew", WARN, "the gateway sent no Date header", "", required=False)


def check_proxy_env(superlink_host: str) -> Row:
    """A row on HTTPS_PROXY and NO_PROXY: whether the gateway goes through the proxy."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if not proxy:
        return Row("proxy", INFO, "no HTTPS_PROXY set: direct connections", required=False)
    used = proxy_for(superlink_host)
    where = "through the proxy" if used else "directly (NO_PROXY)"
    return Row("proxy", INFO, f"HTTPS_PROXY is set; the SuperLink is reached {where}", required=False)


def listening_ports(proc_net: Path = Path("/proc/net")) -> list[str] | None:
    """TCP listeners on non-loopback addresses (Linux, from /proc/net/tcp and tcp6); None elsewhere."""
    found = []
    for name in ("tcp", "tcp6"):
        path = proc_net / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "0A":  # 0A = LISTEN
                continue
            addr, port_hex = parts[1].rsplit(":", 1)
            loopback = addr in ("0100007F", "00000000000000000000000001000000") or addr.endswith("7F")
            if not loopback:
                found.append(str(int(port_hex, 16)))
    if not (proc_net / "tcp").is_file():
        return None
    return sorted(set(found), key=int)


def inbound_row() -> Row | None:
    """What this VM exposes: TCP ports listening beyond loopback (measured; Linux only)."""
    ports = listening_ports()
    if ports is None:
        return None
    if not ports:
        return Row("inbound", PASS, "no TCP port listens beyond loopback (the SuperNode needs none)", required=False)
    return Row(
        "inbound", INFO,
        f"TCP ports listening beyond loopback: {', '.join(ports)} "
        "(none is flowerbed's: the SuperNode listens on 127.0.0.1)",
        "", required=False,
    )  # fmt: skip


# --- output ------------------------------------------------------------------------------------


def render_table(rows: list[Row]) -> str:
    """The rows as a plain text table."""
    width = max(len(r.check) for r in rows)
    lines = ["{:<{w}}  {:<6}  {}".format("CHECK", "RESULT", "DETAIL", w=width)]
    for row in rows:
        lines.append("{:<{w}}  {:<6}  {}".format(row.check, row.status, row.detail, w=width))
        if row.fix and row.status in (FAIL, WARN):
            lines.append("{:<{w}}          fix: {}".format("", row.fix, w=width))
    failed = sum(1 for r in rows if r.blocking)
    lines.append("")
    lines.append(
        "result: {}".format("all required checks passed" if not failed else f"{failed} required check(s) failed")
    )
    return "\n".join(lines)


def render_allowlist(superlink: tuple[str, int] | None, destinations: list[dict[str, Any]]) -> str:
    """The allowlist ticket text: every destination with its port and why."""
    lines = [
        "# Outbound allowlist for a flowerbed site VM (TCP; no inbound rules needed)",
        "# destination\tport\tpurpose",
    ]
    if superlink is not None:
        host, port = superlink
        try:
            ips = sorted({str(a[4][0]) for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except socket.gaierror:
            ips = []
        suffix = " ({})".format(", ".join(ips)) if ips else ""
        lines.append(f"{host}{suffix}\t{port}\tflowerbed SuperLink gateway (TLS, Flower Fleet API)")
    for dest in destinations:
        lines.append("{}\t{}\t{}".format(dest["host"], dest["port"], dest.get("why", "")))
    return "\n".join(lines)


def build_parser(prog: str = "firewall_checklist.py") -> argparse.ArgumentParser:
    """The checklist's command-line parser."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", help="gateway address HOST:PORT (port 9092 if left out; default: the kit's)")
    parser.add_argument("--ca", type=Path, help="federation ca.crt (detects TLS interception; default: the kit's)")
    parser.add_argument(
        "--install-path",
        choices=INSTALL_PATHS,
        default=None,
        help="how packages reach this VM (default in a site kit: offline when it carries wheels/, else conda)",
    )
    parser.add_argument(
        "--os-packages",
        choices=OS_PACKAGES,
        default="none",
        help="also check OS package mirrors (default: none)",
    )
    parser.add_argument(
        "--extra-domain",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="another destination to check (port 443 if left out); repeat",
    )
    parser.add_argument("--domains-file", type=Path, default=DATA_FILE, help="destination data file")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per connection (default 5)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--allowlist", action="store_true", help="print the list for an IT ticket and exit")
    return parser


def apply_kit(args: argparse.Namespace) -> Row:
    """Fill what was not given from the site kit this runs in; the row that says where each came from."""
    kit = find_kit()
    known = kit_defaults(kit) if kit is not None else {}
    taken = []
    if args.superlink is None and "superlink" in known:
        args.superlink = known["superlink"]
        taken.append(f"gateway {args.superlink}")
    if args.ca is None and "ca" in known and args.superlink == known.get("superlink"):
        args.ca = Path(known["ca"])
        taken.append("ca.crt")
    if args.install_path is None:
        args.install_path = known.get("install_path", "conda")
        why = {"offline": "the kit carries wheels/", "conda": "the kit has no wheels/"}[args.install_path]
        taken.append(f"install path {args.install_path} ({why})" if kit is not None else "")
    detail = ", ".join(t for t in taken if t)
    where = f"from the site kit {kit}: {detail}" if kit is not None and detail else "no site kit here: options only"
    return Row("kit", INFO, where, required=False)


def run_checks(args: argparse.Namespace) -> tuple[list[Row], list[dict[str, Any]], tuple[str, int] | None]:
    """The rows of every check, the destinations checked, and the gateway address."""
    kit_row = apply_kit(args)
    destinations = load_destinations(args.domains_file, args.install_path, args.os_packages)
    for extra in args.extra_domain:
        host, port = parse_host_port(extra, 443)
        destinations.append({"host": host, "port": port, "why": "added with --extra-domain"})
    superlink = parse_host_port(args.superlink, 9092) if args.superlink else None
    if args.allowlist:
        return [], destinations, superlink
    rows: list[Row] = [kit_row]
    for dest in destinations:
        rows.extend(check_destination(dest["host"], int(dest["port"]), dest.get("why", ""), args.timeout))
    if superlink is not None:
        if args.ca is not None and not args.ca.is_file():
            rows.append(Row("federation CA", FAIL, f"{args.ca} does not exist", "use ca.crt from the site kit"))
            rows.extend(check_gateway(superlink[0], superlink[1], None, args.timeout))
        else:
            rows.extend(check_gateway(superlink[0], superlink[1], args.ca, args.timeout))
        rows.append(check_proxy_env(superlink[0]))
    else:
        rows.append(Row("gateway", WARN, "not checked", "pass --superlink HOST:9092", required=False))
    inbound = inbound_row()
    if inbound is not None:
        rows.append(inbound)
    return rows, destinations, superlink


def main(argv: list[str] | None = None, prog: str = "firewall_checklist.py") -> int:
    """Run the checklist; returns the exit code (0 only when every required row passes)."""
    args = build_parser(prog).parse_args(argv)
    try:
        rows, destinations, superlink = run_checks(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.allowlist:
        print(render_allowlist(superlink, destinations))
        return 0
    ok = not any(r.blocking for r in rows)
    if args.json:
        print(json.dumps({"ok": ok, "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(render_table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
