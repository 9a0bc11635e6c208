"""Deployment as documented, across separate hosts and through a site's proxy.

A coordinator and two sites, each a network namespace with its own HOME and firewall: the
coordinator accepts nothing inbound but TCP 9092; site inst-a may only open TCP 9092 to the
coordinator; site inst-b may only reach a forward proxy (tinyproxy, on a host of its own), which
may only open TCP 9092 to the coordinator. The commands are the docs' own code blocks, run in
order and exactly as written (docs/quickstart-coordinator.md, then docs/quickstart-site.md on
each site): from nothing to a converged run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flowerbed.demodata import make_demo_data
from tests.hosts.docscript import Block, blocks
from tests.hosts.netns import Host, available, network

DOCS = Path(__file__).parent.parent.parent / "docs"
PROXY = "proxy.example.org"
PROXY_USER, PROXY_PASSWORD = "inst-b", "hospital.proxy-pass"
PROXY_PASSWORD_URL = PROXY_PASSWORD.replace(".", "%2E").replace("-", "%2D")  # percent-encoded, as for '@' or ':'
GATEWAY = "link.example.org"
LOOPBACK = ("127.", "[::1]", "[::ffff:127.")  # as `ss` prints loopback listeners


def _requirements() -> None:
    problem = available() or (None if shutil.which("tinyproxy") else "needs tinyproxy (apt-get install tinyproxy)")
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host suite cannot run in CI: {problem} (scripts/setup.sh --dev installs it)")
        pytest.skip(problem)


def run_block(host: Host, block: Block, cwd: Path, *, substitute: dict[str, str] | None = None) -> Path:
    """Run one doc block on ``host`` in ``cwd``; return the folder it ended in (a block may `cd`)."""
    command = block.command
    for old, new in (substitute or {}).items():
        command = command.replace(old, new)
    marker = host.home / ".cwd"
    result = host.run(f"{command}\npwd > {marker}", cwd=cwd, timeout=900)
    assert result.returncode == 0, f"{host.name}: `{command}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return Path(marker.read_text().strip())


def _table(inbound: str, outbound: str | None) -> str:
    """An nftables table: inbound allows loopback, replies and ``inbound``; outbound (if not None) likewise."""
    rules = [
        "table inet fb {",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
        *(f"    {rule}" for rule in inbound.splitlines() if rule),
        "  }",
    ]
    if outbound is not None:
        rules += [
            "  chain output {",
            "    type filter hook output priority 0; policy drop;",
            "    oif lo accept",
            "    ct state established,related accept",
            *(f"    {rule}" for rule in outbound.splitlines() if rule),
            "  }",
        ]
    return "\n".join([*rules, "}", ""])


def lockdown(coordinator: Host, direct: Host, proxied: Host, proxy: Host) -> None:
    """The firewall of the issue: nothing in but 9092 at the coordinator; sites outbound-only."""
    coordinator.firewall(_table("tcp dport 9092 accept", None))
    direct.firewall(_table("", f"ip daddr {coordinator.address} tcp dport 9092 accept"))
    proxied.firewall(_table("", f"ip daddr {proxy.address} tcp dport 3128 accept"))
    proxy.firewall(_table("tcp dport 3128 accept", f"ip daddr {coordinator.address} tcp dport 9092 accept"))


def start_proxy(proxy: Host, subnet: str) -> None:
    logs = proxy.home / "tinyproxy"
    logs.mkdir(exist_ok=True)
    logs.chmod(0o777)  # tinyproxy drops to nobody
    conf = proxy.home / "tinyproxy.conf"
    conf.write_text(
        f"User nobody\nGroup nogroup\nPort 3128\nListen {proxy.address}\nTimeout 600\n"
        f"Allow {subnet}\nConnectPort 9092\nLogLevel Info\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
        f'PidFile "{logs}/tinyproxy.pid"\nMaxClients 64\n'
    )
    proc = proxy.start("tinyproxy", f"exec tinyproxy -d -c {conf}")
    assert (
        proxy.run("for i in $(seq 50); do ss -Hltn | grep -q ':3128 ' && exit 0; sleep 0.2; done; exit 1").returncode
        == 0
    ), proc.text()


def checklist(site: Host, kit: Path, *extra: str) -> dict[str, dict[str, str]]:
    result = site.run(
        f"python3 firewall_checklist.py --superlink {GATEWAY}:9092 --ca ca.crt --install-path offline --json "
        + " ".join(extra),
        cwd=kit,
    )
    return {row["check"]: row for row in json.loads(result.stdout)["rows"]}


@pytest.mark.federation
def test_from_nothing_to_a_converged_run_on_three_hosts(tmp_path: Path) -> None:
    _requirements()
    coordinator_doc = blocks(DOCS / "quickstart-coordinator.md")
    site_doc = [b for b in blocks(DOCS / "quickstart-site.md") if b.section == "Linux"]
    assert any(b.background for b in coordinator_doc) and any(b.background for b in site_doc)
    data = make_demo_data(tmp_path / "data", ["inst-a", "inst-b", "not-in-this-test"])  # made for three
    with network(tmp_path / "hosts") as net:
        coordinator = net.add("coordinator")
        site_a = net.add("inst-a")
        # The hospital's proxy wants a password (tinyproxy BasicAuth); the URL carries it percent-encoded.
        site_b = net.add("inst-b", env={"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD_URL}@{PROXY}:3128"})
        proxy = net.add("proxy")
        net.name(GATEWAY, coordinator)
        net.name(PROXY, proxy)
        start_proxy(proxy, f"{net.prefix}.0/24")

        # The coordinator's page up to "Run": install (skipped: this checkout is installed), init,
        # certificates and kits, then the coordinator in the background.
        cwd = coordinator.home
        superlink = None
        for block in coordinator_doc:
            if block.section.startswith("5.") or block.skip:
                continue
            if block.background:
                superlink = coordinator.start("superlink", block.command, cwd=cwd)
                assert superlink.saw("is up: gateway 0.0.0.0:9092", 180), superlink.text()
            else:
                cwd = run_block(coordinator, block, cwd)
        assert superlink is not None
        kits = coordinator.home / "fed" / "kits"

        # The coordinator sends each site its archive (out of band); each site has its data.
        for site in (site_a, site_b):
            shutil.copy(kits / f"{site.name}.tar.gz", site.home)
            (site.home / "data").mkdir()
            shutil.copy(data.site_files[site.name], site.home / "data" / f"{site.name}.csv")

        # The firewall checklist before and after the lockdown (an extra destination shows the difference).
        site_a.run(f"tar xzf {site_a.name}.tar.gz")
        before = checklist(site_a, site_a.home / "inst-a", "--extra-domain", f"{PROXY}:3128")
        assert before[f"tls gateway {GATEWAY}:9092"]["status"] == "PASS"
        assert before[f"tcp {PROXY}:3128"]["status"] == "PASS"
        lockdown(coordinator, site_a, site_b, proxy)
        after = checklist(site_a, site_a.home / "inst-a", "--extra-domain", f"{PROXY}:3128")
        assert after[f"tls gateway {GATEWAY}:9092"]["status"] == "PASS"
        assert after[f"tcp {PROXY}:3128"]["status"] == "FAIL"
        assert after["inbound"]["status"] == "PASS"
        # The IT admin's page, as written, on this gateway-only VM with an offline kit (it carries wheels/).
        verify = [b for b in blocks(DOCS / "it-admin.md") if b.section == "Verify"]
        kit_a = site_a.home / "inst-a"
        (kit_a / "wheels").mkdir()
        shutil.copy(next(kit_a.glob("flowerbed-*.whl")), kit_a / "wheels")
        as_written = site_a.run(verify[0].command, cwd=kit_a)
        assert as_written.returncode == 0, as_written.stdout + as_written.stderr
        assert "install path offline (the kit carries wheels/)" in " ".join(as_written.stdout.split())
        offline_line, conda_line, _pip_line = verify[1].command.splitlines()
        assert site_a.run(offline_line, cwd=kit_a).returncode == 0
        conda = site_a.run(conda_line, cwd=kit_a)  # a conda install needs more than this allowlist: said so
        assert conda.returncode == 1 and "does not resolve" in conda.stdout, conda.stdout
        shutil.rmtree(site_a.home / "inst-a")

        # Each site follows its page exactly (inst-b's text is the same with its own name).
        supernodes = {}
        for site in (site_a, site_b):
            cwd = site.home
            for block in site_doc:
                if block.skip:
                    continue
                if block.background:
                    supernodes[site.name] = site.start("supernode", block.command.replace("inst-a", site.name), cwd=cwd)
                else:
                    cwd = run_block(site, block, cwd, substitute={"inst-a": site.name})
        for name, proc in supernodes.items():
            assert proc.saw(f"connected to {GATEWAY}:9092 as node", 180), f"{name}:\n{proc.text()}"
        assert "reachable via proxy proxy.example.org:3128" in " ".join(supernodes["inst-b"].text().split())

        # The run, as the coordinator's page says, converges.
        run = [b for b in coordinator_doc if b.section.startswith("5.")]
        assert len(run) == 1
        run_block(coordinator, run[0], coordinator.home / "fed")
        summaries = [json.loads(p.read_text()) for p in (coordinator.home / "fed" / "runs").glob("*/summary.json")]
        assert len(summaries) == 1 and summaries[0]["status"] == "completed", summaries
        assert summaries[0]["stop_reason"] == "target-reached", summaries
        for name, proc in supernodes.items():
            assert proc.saw("round 1: trained on", 5), f"{name}:\n{proc.text()}"

        # Only loopback listeners on the sites; only 9092 beyond loopback on the coordinator.
        for site in (site_a, site_b):
            assert all(a.startswith(LOOPBACK) for a in site.listeners()), site.listeners()
        exposed = [a for a in coordinator.listeners() if not a.startswith(LOOPBACK)]
        assert exposed == ["0.0.0.0:9092"], coordinator.listeners()
        assert f"{GATEWAY}:9092" in proxy.procs[0].text()  # inst-b's traffic went through the proxy
        for secret in (PROXY_PASSWORD, PROXY_PASSWORD_URL):  # the proxy's password is never shown or logged
            assert secret not in supernodes["inst-b"].text()
            assert not any(secret in p.read_text(errors="replace") for p in (site_b.home / "inst-b").rglob("*.log"))

        # The proxy goes down as a run starts: the coordinator's console names inst-b, with the time since
        # its last contact, within a minute; the site behind the proxy names the proxy; preflight fails.
        proxy.procs[0].stop()
        cut = coordinator.start(
            "run-cut", "flowerbed run --name proxy-cut --max-rounds 1", cwd=coordinator.home / "fed"
        )
        assert cut.saw("site inst-b (node", 90) and cut.saw("no contact for", 5), cut.text()
        cut.stop()
        down = f"the proxy {PROXY}:3128 (HTTPS_PROXY) is unreachable"
        assert supernodes["inst-b"].saw(down, 120), supernodes["inst-b"].text()
        preflight = site_b.run("flowerbed supernode start --kit . --preflight-only", cwd=site_b.home / "inst-b")
        assert preflight.returncode == 3 and down in " ".join((preflight.stdout + preflight.stderr).split())
        assert "Traceback" not in preflight.stdout + preflight.stderr
