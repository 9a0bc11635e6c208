"""Site life cycle while the federation runs, with real processes: list, add, revoke, renew-server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from flowerbed.certs.service import read_cert
from flowerbed.config import RunSettings, load_federation
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port, presents_certificate
from flowerbed.runner import check_result, follow, submit
from flowerbed.superlink.stack import CoordinatorStack, start_stack
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor
from tests.conftest import make_config, make_federation, run_cli, wait_for


@dataclass
class Node:
    supervisor: Supervisor
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    reports: list[str] = field(default_factory=list)

    def start(self) -> Node:
        def body() -> None:
            try:
                self.supervisor.run(self.stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - kept for the test to assert on
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        return self

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)


def node(layout: FederationLayout, site: str, *, key: Path, data: Path, work: Path, gateway: str) -> Node:
    reports: list[str] = []
    # The site's own copy of its key, as unpacked from its kit (revoking moves the coordinator's copy).
    work.mkdir(parents=True, exist_ok=True)
    own = work / "site.key"
    own.write_bytes(key.read_bytes())
    own.chmod(0o600)
    own.with_name("site.key.pub").write_bytes(key.with_name(key.name + ".pub").read_bytes())
    spec = SupernodeSpec(site=site, superlink=gateway, ca=layout.ca_cert, key=own, data=data, workdir=work,
                         port=free_port())  # fmt: skip
    sup = Supervisor(spec, report=reports.append, rejected_window_s=8, max_backoff_s=2)
    return Node(sup, reports=reports).start()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[FederationLayout, list[CoordinatorStack]]]:
    layout = make_federation(tmp_path / "fed", make_config("life", ["site-a", "site-b"], min_nodes=1))
    stacks = [start_stack(layout, load_federation(layout.root))]
    try:
        yield layout, stacks
    finally:
        for stack in stacks:
            stack.stop()


@pytest.mark.federation
def test_sites_add_revoke_and_renew_while_running(
    federation: tuple[FederationLayout, list[CoordinatorStack]], tmp_path: Path
) -> None:
    layout, stacks = federation
    config = load_federation(layout.root)
    gateway = f"localhost:{config.superlink.port}"
    data = make_demo_data(tmp_path / "data", ["site-a", "site-b", "site-c"])
    d = str(layout.root)

    listed = run_cli("sites", "-d", d)
    assert listed.returncode == 0, listed.stderr
    assert "site-a │ registered" in " ".join(listed.stdout.split())

    a = node(
        layout,
        "site-a",
        key=layout.node_key("site-a"),
        data=data.site_files["site-a"],
        work=tmp_path / "a",
        gateway=gateway,
    )
    nodes = [a]
    try:
        assert wait_for(lambda: a.supervisor.connected, 90), a.reports
        # A new site while the coordinator runs: key, kit and registration, no restart.
        added = run_cli("sites", "add", "site-c", "-d", d, timeout=300)
        assert added.returncode == 0, added.stderr
        assert "registered as node" in " ".join(added.stdout.split())
        assert (layout.root / "kits" / "site-c.tar.gz").is_file()
        c = node(
            layout,
            "site-c",
            key=layout.node_key("site-c"),
            data=data.site_files["site-c"],
            work=tmp_path / "c",
            gateway=gateway,
        )
        nodes.append(c)
        assert wait_for(lambda: c.supervisor.connected, 90), c.reports

        settings = RunSettings.model_validate(config.run.model_dump() | {"min_nodes": 2, "max_rounds": 1})
        handle = submit(layout, settings, name="with-c")
        check_result(follow(layout, handle, timeout_s=240), handle)
        table = " ".join(run_cli("sites", "-d", d).stdout.split())
        assert "site-a │ online" in table and "site-c │ online" in table and "with-c" in table
        assert "site-b │ registered" in table

        # Renew the gateway certificate: the gateway serves the new one at once; kits stay valid.
        old = read_cert(layout.server_cert).public_bytes(serialization.Encoding.DER)
        renewed = run_cli("certs", "renew-server", "-d", d)
        assert renewed.returncode == 0, renewed.stderr
        assert "serves it now" in " ".join(renewed.stdout.split())
        new = read_cert(layout.server_cert).public_bytes(serialization.Encoding.DER)
        assert new != old
        assert wait_for(lambda: presents_certificate("127.0.0.1", config.superlink.port, layout.ca_cert, new), 20)
        preflight = run_cli("supernode", "start", "--superlink", gateway, "--ca", str(layout.ca_cert), "--key",
                            str(layout.node_key("site-c")), "--data", str(data.site_files["site-c"]),
                            "--preflight-only")  # fmt: skip
        assert preflight.returncode == 0, preflight.stdout + preflight.stderr

        # Revoke site-a: refused at once, the SuperNode's supervisor stops with "not registered".
        revoked = run_cli("certs", "revoke", "site-a", "-d", d)
        assert revoked.returncode == 0, revoked.stderr
        assert "the SuperLink refuses node" in revoked.stdout
        assert wait_for(lambda: a.error is not None, 180), a.reports
        assert isinstance(a.error, FlowerbedError) and a.error.exit_code == ExitCode.REJECTED
        assert not layout.node_key("site-a").exists()
        revoked_key = next((layout.nodes / "revoked").glob("*-site-a.key"))

        # ... and stays refused after a coordinator restart.
        stacks.pop().stop()
        stacks.append(start_stack(layout, load_federation(layout.root)))
        assert "site-a" not in stacks[-1].registered
        assert "site-a │ revoked" in " ".join(run_cli("sites", "-d", d).stdout.split())
        again = node(
            layout, "site-a", key=revoked_key, data=data.site_files["site-a"], work=tmp_path / "a2", gateway=gateway
        )
        nodes.append(again)
        assert wait_for(lambda: again.error is not None, 180), again.reports
        assert isinstance(again.error, FlowerbedError) and again.error.exit_code == ExitCode.REJECTED
        assert wait_for(lambda: c.supervisor.connected, 120), c.reports  # the others carry on
    finally:
        for n in nodes:
            n.halt()
        for n in nodes:
            assert n.supervisor.process is None or n.supervisor.process.poll() is not None


def test_sites_warns_before_certificates_expire(tmp_path: Path) -> None:
    import datetime as dt

    from flowerbed.certs.ca import CertificateAuthority

    layout = make_federation(tmp_path / "fed", make_config("soon", ["site-a"], min_nodes=1))
    ca = CertificateAuthority.load(layout.ca_cert, layout.ca_key)
    now = dt.datetime.now(dt.UTC)
    soon = ca.issue_server_cert(
        ["localhost"], not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=12)
    )
    layout.server_cert.write_bytes(soon.cert_pem)
    result = run_cli("sites", "-d", str(layout.root))
    text = " ".join(result.stderr.split())
    assert result.returncode == 0
    assert (
        f"the server certificate {layout.server_cert} expires in 11 days: `flowerbed certs renew-server`" in text
        or (f"the server certificate {layout.server_cert} expires in 12 days: `flowerbed certs renew-server`" in text)
    ), text
    assert "site-a │ coordinator stopped" in " ".join(result.stdout.split())
    shown = " ".join(run_cli("certs", "show", "-d", str(layout.root)).stderr.split())
    assert "run `flowerbed certs renew-server`" in shown
