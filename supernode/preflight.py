"""Checks before a SuperNode starts: data, CA, key, device, reachability, TLS identity and clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowerbed.certs.files import check_private_mode
from flowerbed.certs.nodekeys import load_private_key, load_public_key, public_fingerprint
from flowerbed.certs.service import read_cert
from flowerbed.clientapp.device import probe
from flowerbed.deploy.firewall_checklist import FAIL, PASS, check_gateway, parse_host_port
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.supernode.datacheck import check_site_data
from flowerbed.supernode.supervisor import SupernodeSpec


@dataclass(frozen=True)
class Check:
    """One preflight row."""

    name: str
    ok: bool
    detail: str


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a tuple, or a clear error (the checklist's own parser)."""
    try:
        return parse_host_port(address)
    except ValueError:
        raise FlowerbedError(f"--superlink {address!r} must be HOST:PORT, e.g. link.example.org:9092") from None


def check_data(path: Path, site_file: Path | None = None) -> Check:
    """The data path exists, is readable, and loads as round 1 would (a task the site may run reads it)."""
    if not path.exists():
        return Check("data path", False, f"{path} does not exist: pass the folder or CSV with --data")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        return Check("data path", False, f"{path} is not readable by this user")
    try:
        ok, detail = check_site_data(path, site_file)
    except FlowerbedError as exc:  # an unreadable site.toml
        return Check("data path", False, exc.message)
    return Check("data path", ok, detail if ok else f"{path} cannot be trained on: {detail}")


def check_ca(ca: Path) -> Check:
    """The CA certificate exists and parses (a check row naming its subject)."""
    if not ca.is_file():
        return Check("CA certificate", False, f"{ca} is missing: use ca.crt from the site kit")
    try:
        cert = read_cert(ca)
    except FlowerbedError as exc:
        return Check("CA certificate", False, exc.message)
    return Check("CA certificate", True, cert.subject.rfc4514_string())


def check_key(key: Path, site: str = "") -> Check:
    """The node key: this site's own (not a link out of its folder), private, and the pair of its ``.pub``."""
    if not key.is_file():
        return Check("node key", False, f"{key} is missing: use the SITE.key from the site kit")
    if key.is_symlink() and key.resolve().parent != key.parent.resolve():
        return Check("node key", False, f"{key} is a link to {key.resolve()}, outside its kit: put this site's own "
                     "key from its kit there")  # fmt: skip
    problem = check_private_mode(key)
    if problem:
        return Check("node key", False, problem)
    pub = key.with_name(key.name + ".pub")
    if not pub.is_file():
        return Check("node key", False, f"{key}.pub is missing: keep the .pub file next to the key")
    try:
        private, public = load_private_key(key), load_public_key(pub)
    except FlowerbedError as exc:
        return Check("node key", False, exc.message)
    if private.public_key().public_numbers() != public.public_numbers():
        return Check("node key", False, f"{key} is not the private half of {pub} ({public_fingerprint(public)}): "
                     "use the key pair from this site's own kit")  # fmt: skip
    made_for = (pub.read_text("utf-8", errors="replace").split()[2:] or [""])[0]
    if site and made_for and made_for != site and not made_for.endswith("/" + site):
        return Check("node key", False, f"{pub} was made for {made_for}, not site {site}: use this site's own kit")
    return Check("node key", True, f"{key} (mode 600)")


def check_tls(host: str, port: int, ca: Path, timeout_s: float = 10.0, *, clock: bool = True) -> tuple[Check, Check]:
    """Reach and a verified TLS handshake with the clock skew, as the firewall checklist checks them.

    One implementation for both (deploy/firewall_checklist.py must stay a standalone stdlib file,
    so this module imports it): through ``HTTPS_PROXY`` when one applies, as the SuperNode
    connects, with each failure naming its hop and a wrong CA file told apart from interception.
    """
    rows = check_gateway(host, port, ca, timeout_s)
    if rows[0].status == FAIL:
        return Check("reach", False, f"{rows[0].detail}: {rows[0].fix}"), Check("TLS", False, "not tried")
    reach = Check("reach", True, f"TCP {host}:{port} {rows[0].detail}")
    failed = next((r for r in rows[1:] if r.status == FAIL and (clock or r.check != "clock skew")), None)
    if failed is not None:
        return reach, Check("TLS", False, f"{failed.detail}: {failed.fix}")
    detail = f"verified against {ca.name}"
    skew = next((r for r in rows if r.check == "clock skew" and r.status == PASS), None)
    if skew is not None:
        detail += f", clock skew {skew.detail.split(' ')[0]} s"
    return reach, Check("TLS", True, detail)


def link_probe(spec: SupernodeSpec) -> Callable[[], tuple[bool, str]]:
    """The check the supervisor runs while Flower reports failed connection attempts."""
    host, port = parse_address(spec.superlink)

    def probe() -> tuple[bool, str]:
        reach, tls = check_tls(host, port, spec.ca, timeout_s=5.0, clock=False)  # the clock is checked apart
        failed = next((c for c in (reach, tls) if not c.ok), None)
        return (True, reach.detail) if failed is None else (False, failed.detail)

    return probe


def clock_probe(spec: SupernodeSpec) -> Callable[[], float | None]:
    """Seconds this VM's clock is ahead of the gateway's (from its HTTP Date header); None: not measured."""
    host, port = parse_address(spec.superlink)

    def probe() -> float | None:
        rows = check_gateway(host, port, spec.ca, 5.0)
        return next((r.value for r in rows if r.check == "clock skew"), None)

    return probe


def run_preflight(
    superlink: str,
    ca: Path,
    key: Path,
    data: Path,
    *,
    site: str = "",
    site_file: Path | None = None,
    device: str = "auto",
) -> list[Check]:
    """Every check, in order; network checks only run when CA and key are fine."""
    host, port = parse_address(superlink)
    found = probe(device)
    checks = [check_data(data, site_file), check_ca(ca), check_key(key, site), Check("device", found.ok, found.detail)]
    if checks[1].ok:
        checks.extend(check_tls(host, port, ca))
    checks.append(check_ckks())
    return checks


def check_ckks() -> Check:
    """Whether this site can take part in ``ckks`` runs (TenSEAL importable); never fails the preflight."""
    from importlib.metadata import PackageNotFoundError, version

    from flowerbed.ckks import available

    if available():
        try:
            found = version("tenseal")
        except PackageNotFoundError:
            found = "installed"
        return Check("encrypted aggregation (ckks)", True, f"TenSEAL {found}: this site can take part in ckks runs")
    missing = ("TenSEAL is not installed (no wheel for this platform?): this site refuses ckks runs; plain and "
               "secagg+ runs work (pip install 'flowerbed[he]' to add it)")  # fmt: skip
    return Check("encrypted aggregation (ckks)", True, missing)


def require(checks: list[Check]) -> None:
    """Raise with the first failed check's message."""
    for check in checks:
        if not check.ok:
            raise FlowerbedError(f"preflight: {check.name}: {check.detail}", exit_code=ExitCode.PREFLIGHT_FAILED)
