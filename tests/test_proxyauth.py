"""A forward proxy that wants a password: real tinyproxy with BasicAuth on loopback.

The firewall checklist and the SuperNode's preflight go through it with the credentials in
HTTPS_PROXY (percent-encoded), tell a wrong password from a missing one, and never print the
password; a SuperNode trains through it (Flower's own client sends the credentials too).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowerbed.certs.nodekeys import NodeKeyPair
from flowerbed.config import RunSettings
from flowerbed.errors import ExitCode
from flowerbed.probes import free_port, tcp_open
from flowerbed.runner import check_result, follow, submit
from flowerbed.superlink import control
from tests.conftest import RunningFederation, assert_clean_error, run_cli, wait_for
from tests.test_supernode import start_args

# tinyproxy takes letters, digits, '.', '-' and '_' only; the URL percent-encodes every other
# character than letters and digits, so decoding is exercised as for a password with '@' or ':'.
USER, PASSWORD = "site-user", "s3cret.pass_word"


WRONG = "nope"


def encoded(text: str) -> str:
    return "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in text)


pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="needs tinyproxy (scripts/setup.sh --dev)")


def proxy_url(port: int, user: str | None = USER, password: str = PASSWORD) -> str:
    if user is None:
        return f"http://127.0.0.1:{port}"
    return f"http://{encoded(user)}:{encoded(password)}@127.0.0.1:{port}"


@contextmanager
def tinyproxy(folder: Path, target_port: int) -> Iterator[int]:
    """A real tinyproxy on 127.0.0.1 that demands Basic authentication and tunnels only to ``target_port``."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # tinyproxy drops to nobody
    conf = folder / "tinyproxy.conf"
    conf.write_text(
        f"User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\n"
        f"ConnectPort {target_port}\n"
        f'BasicAuth {USER} {PASSWORD}\nLogLevel Info\nPidFile "{folder}/tinyproxy.pid"\nMaxClients 64\n'
    )
    conf.chmod(0o644)
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: tcp_open("127.0.0.1", port), 20), proc.stderr.read() if proc.stderr else ""  # type: ignore[union-attr]
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def checklist(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).parent.parent / "deploy" / "firewall_checklist.py"
    return subprocess.run([sys.executable, str(script), *args, "--install-path", "offline"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_PROXY": "", "no_proxy": "", **env}, check=False)  # fmt: skip


@pytest.mark.federation
def test_checklist_and_preflight_authenticate_to_the_proxy(running: RunningFederation, tmp_path: Path) -> None:
    lay = running.layout
    args = start_args(running.gateway, lay.ca_cert, lay.node_key("inst-a"), running.data.test_file)
    with tinyproxy(tmp_path / "proxy", running.config.superlink.port) as port:
        good = checklist("--superlink", running.gateway, "--ca", str(lay.ca_cert), env={"HTTPS_PROXY": proxy_url(port)})
        assert good.returncode == 0, good.stdout + good.stderr
        assert f"reachable via proxy 127.0.0.1:{port}" in good.stdout
        wrong_url = proxy_url(port, password=WRONG)
        wrong = checklist("--superlink", running.gateway, env={"HTTPS_PROXY": wrong_url})
        missing = checklist("--superlink", running.gateway, env={"HTTPS_PROXY": proxy_url(port, user=None)})
        for env_url in (proxy_url(port), wrong_url, proxy_url(port, user=None)):
            preflight = run_cli(*args, "--preflight-only", "--workdir", str(tmp_path / "w"),
                                env={"HTTPS_PROXY": env_url, "NO_PROXY": "", "no_proxy": ""})  # fmt: skip
            if env_url == proxy_url(port):
                assert preflight.returncode == 0, preflight.stdout + preflight.stderr
                assert f"reachable via proxy 127.0.0.1:{port}" in " ".join(preflight.stdout.split())
            elif env_url == wrong_url:
                assert_clean_error(preflight, ExitCode.PREFLIGHT_FAILED,
                                   f"the proxy 127.0.0.1:{port} refused the user name or password in HTTPS_PROXY")  # fmt: skip
            else:
                assert_clean_error(preflight, ExitCode.PREFLIGHT_FAILED,
                                   f"the proxy 127.0.0.1:{port} wants credentials (40", "and HTTPS_PROXY has none")  # fmt: skip
            assert PASSWORD not in preflight.stdout + preflight.stderr
            assert encoded(PASSWORD) not in preflight.stdout + preflight.stderr
    text = " ".join(wrong.stdout.split())
    assert wrong.returncode == 1 and "refused the user name or password in HTTPS_PROXY (40" in text, text
    assert "percent-encode special characters" in text
    text = " ".join(missing.stdout.split())
    assert missing.returncode == 1 and "wants credentials (40" in text and "and HTTPS_PROXY has none" in text, text
    for result in (good, wrong, missing):
        assert PASSWORD not in result.stdout + result.stderr and encoded(PASSWORD) not in result.stdout + result.stderr


@pytest.mark.federation
def test_a_supernode_trains_through_a_proxy_that_wants_a_password(running: RunningFederation, tmp_path: Path) -> None:
    key = tmp_path / "auth-site.key"
    NodeKeyPair.generate("auth-site").write(key, tmp_path / "auth-site.key.pub")
    control.register_node(running.layout.flwr_home, tmp_path / "auth-site.key.pub", "auth-site")
    work = tmp_path / "work"
    args = start_args(running.gateway, running.layout.ca_cert, key, running.data.site_files["inst-a"],
                      "--workdir", str(work), "--port", str(free_port()), "--site", "auth-site")  # fmt: skip
    lines: list[str] = []
    with tinyproxy(tmp_path / "proxy", running.config.superlink.port) as port:
        url = proxy_url(port)
        env = {**os.environ, "HTTPS_PROXY": url, "HTTP_PROXY": url, "NO_PROXY": "", "no_proxy": "", "COLUMNS": "200"}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "flowerbed"), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            assert wait_for(lambda: any("connected to" in line for line in lines), 90), "".join(lines)
            settings = RunSettings.model_validate(running.config.run.model_dump() | {"min_nodes": 1, "max_rounds": 1})
            handle = submit(running.layout, settings, name="through-auth-proxy")
            check_result(follow(running.layout, handle, timeout_s=240), handle)
            assert wait_for(lambda: any("trained on" in line for line in lines), 10), "".join(lines)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    written = "".join(lines) + "".join(p.read_text(errors="replace") for p in work.rglob("*") if p.is_file()
                                      and p.suffix in (".log", ".jsonl", ".json", ".txt"))  # fmt: skip
    for secret in (PASSWORD, encoded(PASSWORD)):
        assert secret not in written  # never in the console, a log or the audit trail
