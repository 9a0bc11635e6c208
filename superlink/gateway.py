"""The nginx Fleet gateway: render its config from the template and run it unprivileged."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from flowerbed.deploy.render import fill
from flowerbed.errors import FlowerbedError
from flowerbed.proc import ManagedProcess, bin_dir, child_env

INSTALL_HINT = "install it with `sudo apt-get install nginx` (Debian/Ubuntu) and run again"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> str:
    """Path of the nginx binary, or a one-line error that says how to install it.

    Looks at $FLOWERBED_NGINX, then this environment's bin folder (conda-forge's nginx, as the
    superlink env file installs it), then PATH and /usr/sbin.
    """
    forced = os.environ.get("FLOWERBED_NGINX")
    if forced:
        if not Path(forced).is_file():
            raise FlowerbedError(f"FLOWERBED_NGINX is {forced}, which does not exist: fix or unset it")
        return forced
    for candidate in (str(bin_dir() / "nginx"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FlowerbedError(f"nginx is missing (the Fleet gateway needs it): {INSTALL_HINT}")


def render_config(
    prefix: Path,
    *,
    listen_host: str,
    listen_port: int,
    upstream_port: int,
    cert: Path,
    key: Path,
    ca: Path,
    logs: Path,
    idle_timeout_s: int = 60,
) -> Path:
    """Write PREFIX/nginx.conf (and its temp folders) and return its path; nginx logs go to ``logs``."""
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    values = {
        "PREFIX": str(prefix.resolve()),
        "LISTEN": listen,
        "UPSTREAM_PORT": str(upstream_port),
        "CERT": str(cert.resolve()),
        "KEY": str(key.resolve()),
        "CA": str(ca.resolve()),
        "IDLE": str(idle_timeout_s),
        "LOGS": str(logs.resolve()),
    }
    text = fill("gateway-nginx.conf", values)
    logs.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(parents=True, exist_ok=True)  # nginx opens PREFIX/logs/error.log before reading the config
    for name in TEMP_DIRS:
        (prefix / "tmp" / name).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    return conf


def _args(nginx: str, prefix: Path) -> list[str]:
    prefix = prefix.resolve()
    return [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "logs/error.log")]


def validate(nginx: str, prefix: Path) -> None:
    """``nginx -t`` on the rendered config; its complaint becomes the error message."""
    result = subprocess.run(
        [*_args(nginx, prefix), "-t", "-q"], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        msg = " ".join(result.stderr.split())
        raise FlowerbedError(f"the gateway config {prefix / 'nginx.conf'} is invalid: {msg}")


def gateway_process(nginx: str, prefix: Path, log_path: Path) -> ManagedProcess:
    """nginx in the foreground as a child of the supervisor (no daemon, own prefix)."""
    return ManagedProcess(
        name="gateway (nginx)",
        argv=[*_args(nginx, prefix), "-g", "daemon off;"],
        log_path=log_path,
        env=child_env(),
        die_with_parent=True,
    )
