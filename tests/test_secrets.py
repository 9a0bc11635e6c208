"""Secrets stay private on the coordinator's disk, and a site runs only with its own key.

A federation in a folder every user can enter; kits built and a run made by the real `flowerbed`
commands; then the `nobody` user tries to read the kits, the models and the database. Then a kit
whose node key is a link to another site's key is refused at preflight.
"""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerbed.config import DATA_PLACEHOLDER
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from flowerbed.filemodes import readable_by_others
from tests.conftest import SITES, assert_clean_error, make_config, make_federation, run_cli, supervised_sites, wait_for


def as_nobody_reads(path: Path) -> bool:
    """Whether the `nobody` user can read ``path`` (a real second Unix user, through setpriv)."""
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat", str(path)],
                          capture_output=True, timeout=30, check=False)  # fmt: skip
    return done.returncode == 0


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder under /tmp that every user may enter (pytest's own tmp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="flowerbed-secrets-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.federation
def test_kits_models_and_databases_are_the_coordinators_alone(open_folder: Path, tmp_path: Path) -> None:
    config = make_config("secrets", SITES[:2], min_nodes=2, max_rounds=1)
    layout = make_federation(open_folder / "fed", config)
    layout.root.chmod(0o755)  # as a user's own `mkdir` leaves it
    data = make_demo_data(tmp_path / "data", SITES)
    built = run_cli("kit", "build", "-d", str(layout.root), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    control = layout.root / "public-note.txt"  # proves the check: a file left readable is read by nobody
    control.write_text("readable")
    control.chmod(0o644)
    assert as_nobody_reads(control)
    old = layout.runs / "old-run"  # what an older flowerbed left: named at start
    old.mkdir(parents=True)
    (old / "final_model.pt").write_bytes(b"weights")
    (old / "final_model.pt").chmod(0o644)
    proc = subprocess.Popen([sys.executable, "-m", "flowerbed", "superlink", "start", "-d", str(layout.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert wait_for(layout.pidfile.exists, 120), "the coordinator did not start"
        with supervised_sites(layout, f"localhost:{config.superlink.port}",
                              {s: data.site_files[s] for s in SITES[:2]}, tmp_path / "work"):  # fmt: skip
            ran = run_cli("run", "-d", str(layout.root), "--name", "private", timeout=600)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    flat = " ".join(output.split())
    assert "file(s) or folder(s) in" in flat and "can be read by other users" in flat, flat
    assert f"chmod -R go-rwx {layout.root}" in flat
    run = layout.runs / "private"
    secrets = [*(layout.root / "kits").glob(f"{SITES[0]}.*"), layout.root / "kits" / SITES[0] / f"{SITES[0]}.key",
               *run.rglob("*.pt"), run / "history.csv", layout.database]  # fmt: skip
    assert run / "final_model.pt" in secrets and len(list(run.rglob("*.pt"))) >= 2  # checkpoints too
    assert len([p for p in secrets if p.suffix in (".zip", ".gz")]) == 1  # the kit's one archive
    for path in secrets:
        assert path.is_file(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
        assert not as_nobody_reads(path), path
    for folder in (run, layout.root / "kits", layout.state):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    exposed = [
        p for p in readable_by_others(layout.root) if p.is_relative_to(run) or p.is_relative_to(layout.root / "kits")
    ]
    assert exposed == []


@pytest.mark.federation
def test_a_node_key_that_is_not_this_sites_own_is_refused(tmp_path: Path) -> None:
    """A link to another site's key, a copy of it, and another site's whole pair: each refused at preflight."""
    config = make_config("keys", SITES[:2], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    built = run_cli("kit", "build", "-d", str(layout.root), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    a, b = SITES[:2]
    kit, other = layout.root / "kits" / a, layout.root / "kits" / b
    data = make_demo_data(tmp_path / "data", SITES).site_files[a]
    site_file = kit / "site.toml"
    site_file.write_text(site_file.read_text().replace(DATA_PLACEHOLDER, str(data)))
    key = kit / f"{a}.key"
    key.unlink()
    key.symlink_to(other / f"{b}.key")  # another site's key, outside the kit
    assert_clean_error(run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit), ExitCode.PREFLIGHT_FAILED,
                       f"preflight: node key: {key} is a link to", "outside its kit")  # fmt: skip
    key.unlink()
    shutil.copyfile(other / f"{b}.key", key)  # a copy: the pair does not match
    key.chmod(0o600)
    assert_clean_error(run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit), ExitCode.PREFLIGHT_FAILED,
                       f"is not the private half of {kit / (a + '.key.pub')}")  # fmt: skip
    for name in (f"{b}.key", f"{b}.key.pub"):  # the whole pair of another site, under this site's names
        shutil.copyfile(other / name, kit / name.replace(b, a))
    key.chmod(0o600)
    assert_clean_error(run_cli("supernode", "start", "--kit", ".", "--preflight-only", cwd=kit), ExitCode.PREFLIGHT_FAILED,
                       f"was made for keys/{b}, not site {a}")  # fmt: skip
