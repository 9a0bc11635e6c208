"""Per-site startup kits: contents, secrecy, atomic builds, kit checks, and SuperNodes started from kits."""

from __future__ import annotations

import datetime as dt
import hashlib
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerbed.certs.ca import CertificateAuthority
from flowerbed.config import Site, load_federation
from flowerbed.deploy import install
from flowerbed.deploy.kit import build_kits
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port
from flowerbed.superlink import flwrcli
from flowerbed.supernode.sitekit import site_spec
from tests.conftest import assert_clean_error, coordinator, make_config, make_federation, run_cli, wait_for

KIT_SITES = ["kit-a", "kit-b", "kit-c"]
KIT_FILES = {
    "ca.crt", "server.crt", "site.toml", "environment.yml", "environment-cuda.yml", "firewall_checklist.py",
    "allowlist.json", "start-supernode.sh", "start-supernode.ps1", "install-offline.sh", "install-offline.ps1",
    "flowerbed-supernode.service", "README.md",
}  # fmt: skip


@pytest.fixture(scope="module")
def kitfed(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    config = make_config("kits", KIT_SITES)
    config.sites[-1] = Site(name=KIT_SITES[-1], platform="windows")  # its kit is a .zip, the others' a .tar.gz
    layout = make_federation(tmp_path_factory.mktemp("kits") / "fed", config)
    result = run_cli("kit", "build", "-d", str(layout.root))
    assert result.returncode == 0, result.stderr
    return layout


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.federation
def test_kit_contents_and_readme(kitfed: FederationLayout) -> None:
    for site in KIT_SITES:
        folder = kitfed.root / "kits" / site
        wheel = {p.name for p in folder.glob("flowerbed-*.whl")}
        assert len(wheel) == 1 and next(iter(wheel)).startswith("flowerbed-0.1.0-")
        assert {p.name for p in folder.iterdir()} == KIT_FILES | {f"{site}.key", f"{site}.key.pub"} | wheel
        assert (folder / f"{site}.key").stat().st_mode & 0o777 == 0o600
        readme = (folder / "README.md").read_text()
        for name in KIT_FILES | {f"{site}.key", f"{site}.key.pub"} | wheel:
            assert f"`{name}`" in readme, name
        # one install path, written the same way everywhere
        assert install.ONLINE in readme and install.OFFLINE in readme
        site_toml = (folder / "site.toml").read_text()
        assert f'site = "{site}"' in site_toml and 'superlink_address = "localhost"' in site_toml


@pytest.mark.federation
def test_archives_hold_no_ca_key_and_no_other_site_key(kitfed: FederationLayout) -> None:
    secrets = {digest(kitfed.ca_key.read_bytes()): "CA key", digest(kitfed.server_key.read_bytes()): "server key"}
    for site in KIT_SITES:
        secrets[digest(kitfed.node_key(site).read_bytes())] = f"{site} key"
    for site in KIT_SITES:
        allowed = {f"{site} key"}
        windows = site == KIT_SITES[-1]
        archives = {p.name for p in (kitfed.root / "kits").glob(f"{site}.*")}
        assert archives == {f"{site}.zip" if windows else f"{site}.tar.gz"}  # one archive, the site's own format
        if windows:
            with zipfile.ZipFile(kitfed.root / "kits" / f"{site}.zip") as zf:
                members = {n: zf.read(n) for n in zf.namelist()}
                assert (zf.getinfo(f"{site}/{site}.key").external_attr >> 16) & 0o777 == 0o600
        else:
            with tarfile.open(kitfed.root / "kits" / f"{site}.tar.gz") as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
                assert tar.getmember(f"{site}/{site}.key").mode & 0o777 == 0o600
        for name, data in members.items():
            found = secrets.get(digest(data))
            assert found is None or found in allowed, f"{name} in {site}'s kit is the {found}"
            assert not name.endswith(("ca.key", "server.key"))
        assert len(members) == len(KIT_FILES) + 3  # + the key pair and the flowerbed wheel
        assert (kitfed.root / "kits" / (f"{site}.zip" if windows else f"{site}.tar.gz")).stat().st_mode & 0o777 == 0o600


@pytest.mark.federation
def test_rebuild_reuses_ca_and_keys(kitfed: FederationLayout) -> None:
    before = {p: p.read_bytes() for p in [kitfed.ca_cert, kitfed.ca_key, *kitfed.nodes.iterdir()]}
    built = build_kits(kitfed, load_federation(kitfed.root), ["kit-a"], archive_format="zip")  # `kit build --format`
    assert built[0].archive.name == "kit-a.zip"
    assert {p.name for p in (kitfed.root / "kits").glob("kit-a.*")} == {"kit-a.zip"}  # the old .tar.gz is gone
    build_kits(kitfed, load_federation(kitfed.root), ["kit-a"])
    assert {p.name for p in (kitfed.root / "kits").glob("kit-a.*")} == {"kit-a.tar.gz"}
    assert {p: p.read_bytes() for p in before} == before
    assert (kitfed.root / "kits" / "kit-a" / "kit-a.key").read_bytes() == kitfed.node_key("kit-a").read_bytes()


def test_failed_build_leaves_nothing_half_written(tmp_path: Path) -> None:
    config = make_config("broken", ["good", "bad"])
    layout = make_federation(tmp_path / "fed", config)
    layout.node_pub("bad").unlink()
    with pytest.raises(FlowerbedError, match=r"bad\.key\.pub is missing"):
        build_kits(layout, config)
    assert list((layout.root / "kits").iterdir()) == []


def unpack(kitfed: FederationLayout, site: str, dest: Path, data: Path) -> Path:
    """The site's archive unpacked as its researcher would (the Windows site's .zip with Python's zipfile)."""
    if (kitfed.root / "kits" / f"{site}.zip").exists():
        with zipfile.ZipFile(kitfed.root / "kits" / f"{site}.zip") as zf:
            zf.extractall(dest)  # noqa: S202 - the kit this test built
        # Python's zipfile keeps no modes (on Windows the key is private by its folder's ACL); this test
        # starts every kit with the Linux script.
        (dest / site / f"{site}.key").chmod(0o600)
        (dest / site / "start-supernode.sh").chmod(0o755)
    else:
        with tarfile.open(kitfed.root / "kits" / f"{site}.tar.gz") as tar:
            tar.extractall(dest, filter="data")
    folder = dest / site
    text = (
        (folder / "site.toml")
        .read_text()
        .replace('data_path = "CHANGE-ME: /path/to/your/data.csv or image folder"', f'data_path = "{data}"')
    )
    (folder / "site.toml").write_text(text)
    return folder


@pytest.mark.federation
def test_kit_checks_refuse_clearly(kitfed: FederationLayout, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,target\n1,0\n2,1\n3,0\n4,1\n")  # enough rows for the preflight to train on
    folder = unpack(kitfed, "kit-a", tmp_path / "k1", data)
    placeholder = tmp_path / "k0"
    with tarfile.open(kitfed.root / "kits" / "kit-a.tar.gz") as tar:
        tar.extractall(placeholder, filter="data")
    assert_clean_error(run_cli("supernode", "start", "--kit", str(placeholder / "kit-a")), ExitCode.PREFLIGHT_FAILED,
                       "set data_path in")  # fmt: skip

    # A held-out test file named in site.toml, relative to the kit, reaches the SuperNode's node config.
    toml = (folder / "site.toml").read_text()
    assert 'test_path = ""' in toml  # the kit shows the key, empty
    (folder / "site.toml").write_text(toml.replace('test_path = ""', 'test_path = "held-out.csv"'))
    spec = site_spec(folder)
    assert spec.extra_node_config == {"test-path": str((folder / "held-out.csv").resolve())}
    assert 'test-path="' in spec.node_config()
    (folder / "site.toml").write_text(toml)

    (folder / "kit-a.key").chmod(0o644)
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.PREFLIGHT_FAILED,
                       "other users can read it")  # fmt: skip
    (folder / "kit-a.key").chmod(0o600)

    toml = (folder / "site.toml").read_text()
    (folder / "site.toml").write_text(
        toml.replace('superlink_address = "localhost"', 'superlink_address = "other.org"')
    )
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.PREFLIGHT_FAILED,
                       "'other.org' in site.toml is not a name of the gateway certificate")  # fmt: skip
    (folder / "site.toml").write_text(toml)

    ca = CertificateAuthority.load(kitfed.ca_cert, kitfed.ca_key)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    old = ca.issue_server_cert(["localhost"], not_before=past, not_after=past + dt.timedelta(days=1))
    saved = (folder / "server.crt").read_bytes()
    (folder / "server.crt").write_bytes(old.cert_pem)
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.PREFLIGHT_FAILED,
                       "the gateway certificate (server.crt) expired on")  # fmt: skip
    (folder / "server.crt").write_bytes(saved)

    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.PREFLIGHT_FAILED,
                       "ca.crt (the federation CA) is damaged, not a PEM certificate", "unpack the whole")  # fmt: skip
    (folder / "ca.crt").unlink()
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.PREFLIGHT_FAILED,
                       "ca.crt is missing from", "the kit is incomplete")  # fmt: skip
    (folder / "site.toml").rename(folder / "site.toml.bak")
    truncated = run_cli("supernode", "start", "--kit", str(folder))
    assert_clean_error(truncated, ExitCode.ERROR, "site.toml does not exist: the kit is incomplete: unpack the whole")
    assert "flowerbed init" not in truncated.stderr  # the coordinator's command means nothing to a site
    (folder / "site.toml.bak").rename(folder / "site.toml")
    (folder / "site.toml").write_text(toml + "\nunknown = 1\n")
    assert_clean_error(run_cli("supernode", "start", "--kit", str(folder)), ExitCode.INVALID_CONFIG,
                       "unknown: Extra inputs are not permitted")  # fmt: skip
    assert_clean_error(run_cli("supernode", "start"), ExitCode.ERROR, "pass --kit KIT_FOLDER, or all of --superlink")


@pytest.fixture
def kit_stack(kitfed: FederationLayout) -> Iterator[FederationLayout]:
    with coordinator(kitfed, load_federation(kitfed.root)):
        yield kitfed


@pytest.mark.federation
def test_three_supernodes_start_from_unpacked_kits(kit_stack: FederationLayout, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,target\n1,0\n2,1\n3,0\n4,1\n")  # enough rows for the preflight to train on
    procs = []
    try:
        for site in KIT_SITES:
            folder = unpack(kit_stack, site, tmp_path / "unpacked", data)
            procs.append(subprocess.Popen(
                [str(folder / "start-supernode.sh"), "--port", str(free_port())],
                env={"FLOWERBED": str(Path(sys.executable).parent / "flowerbed"), "PATH": "/usr/bin:/bin"},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            ))  # fmt: skip
        online: list[dict[str, object]] = []

        def all_online() -> bool:
            online[:] = [n for n in flwrcli.list_nodes(kit_stack.flwr_home) if n["status"] == "online"]
            return len(online) == 3 or any(p.poll() is not None for p in procs)

        wait_for(all_online, 120, step=2)
        assert len(online) == 3, [p.poll() for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    for output in outputs:
        assert "connected to localhost:" in " ".join(output.split()), output
    assert all(p.returncode == 0 for p in procs)


@pytest.mark.federation
def test_kit_checklist_runs_from_the_kit_folder(kitfed: FederationLayout) -> None:
    folder = kitfed.root / "kits" / "kit-b"
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(folder / "firewall_checklist.py"), "--superlink", "localhost", "--allowlist"],
        capture_output=True, text=True, timeout=30, check=False, cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "download.pytorch.org\t443" in result.stdout


@pytest.mark.federation
def test_coordinator_unit_command(kitfed: FederationLayout) -> None:
    result = run_cli("kit", "coordinator-unit", "-d", str(kitfed.root), "--flowerbed", "/opt/fb/bin/flowerbed")
    assert result.returncode == 0
    assert f"ExecStart=/opt/fb/bin/flowerbed superlink start -d {kitfed.root.resolve()}" in result.stdout
    assert "Restart=on-failure" in result.stdout


@pytest.mark.federation
def test_bundle_refuses_unknown_role(tmp_path: Path) -> None:
    assert_clean_error(run_cli("bundle", "wheels", "--out", str(tmp_path), "--role", "nope"), ExitCode.INVALID_CONFIG,
                       "Invalid value for '--role': 'nope' is not one of")  # fmt: skip
