"""A site's approvals: what may touch its data is decided at the site, by sha256, before any import.

The decisions on real wheels, FABs and site.toml files; then a real federation where the
coordinator pushes a Flower App of its own, approved at one site only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowerbed.artifacts import KIT_CLIENTAPP, build_fab, read_app, read_fab_bytes, sha256_file
from flowerbed.config import SITE_FILE, RunSettings, SiteKitConfig, load_toml_model, save_toml_model
from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.flower import TRACE_ENV, compat, supernode
from flowerbed.keeper import RunKeeper
from flowerbed.runner import write_app_manifest
from flowerbed.supernode.approval import approve, candidate, decide, revoke
from tests.conftest import (
    SITES,
    assert_clean_error,
    coordinator,
    make_config,
    make_federation,
    run_cli,
    supervised_sites,
)
from tests.test_flower_hooks import traced
from tests.test_taskpkg import build_wheel, markers

ROGUE_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue-app"
version = "1.0.0"
description = "A Flower App the sites were not asked about"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "rogue_server:app"
clientapp = "rogue_client:app"

[tool.flwr.app.config]
out = "{out}"
"""

ROGUE_CLIENT = """
import os
from pathlib import Path

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

if os.environ.get("TASK_MARKER"):
    (Path.cwd() / f"task-imported-{os.getpid()}").write_text("rogue")

app = ClientApp()


@app.train()
def train(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"rows-read": 1})}), reply_to=msg)
"""

ROGUE_SERVER = """
import json
import os
import subprocess
import sys
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    out = [[r.has_error(), str(r.error.reason) if r.has_error() else "ok"] for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
"""


def rogue_app(folder: Path, out: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT.format(out=out))
    (folder / "rogue_client.py").write_text(ROGUE_CLIENT)
    (folder / "rogue_server.py").write_text(ROGUE_SERVER)
    return folder


def kit_site(folder: Path, site: str, **extra: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_toml_model(
        folder / SITE_FILE, SiteKitConfig(federation="fed", site=site, superlink_address="localhost", **extra)
    )
    return folder / SITE_FILE


def kit_fab(tmp_path: Path, settings: RunSettings) -> bytes:
    """The FAB of flowerbed's own manifest-only app, as `flowerbed run` submits it."""
    return build_fab(write_app_manifest(tmp_path / "manifest", settings.to_run_config()).parent)


@pytest.mark.federation
def test_the_sites_decisions_on_real_wheels_fabs_and_site_files(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    digest = sha256_file(wheel)
    site_file = kit_site(tmp_path / "kit", "site-a")
    own = RunSettings(task="ct-triage", task_sha256=digest)
    own_fab = read_fab_bytes(kit_fab(tmp_path, own))
    assert own_fab.is_kit_app and own_fab.components["clientapp"] == KIT_CLIENTAPP

    refused = decide(site_file, "site-a", own_fab, own.to_run_config())
    assert not refused.allowed and refused.reason.startswith(f"site site-a refused task ct-triage (sha256 {digest})")
    assert "`flowerbed supernode approve`" in refused.reason

    entry, new = approve(site_file.parent, candidate(wheel))
    assert new and entry.file.startswith("approved/") and (site_file.parent / entry.file).is_file()
    assert load_toml_model(site_file, SiteKitConfig).approved[0].sha256 == digest
    allowed = decide(site_file, "site-a", own_fab, own.to_run_config())
    assert allowed.allowed and allowed.wheel == site_file.parent / entry.file

    other = RunSettings(task="ct-triage", task_sha256="0" * 64)  # another build of the same task
    why = decide(site_file, "site-a", own_fab, other.to_run_config()).reason
    assert f"another build of ct-triage is approved here (sha256 {digest})" in why

    builtin = RunSettings()
    builtin_fab = read_fab_bytes(kit_fab(tmp_path / "b", builtin))
    assert decide(site_file, "site-a", builtin_fab, builtin.to_run_config()).allowed
    assert decide(None, "site-a", builtin_fab, builtin.to_run_config()).allowed  # no kit: built-ins only
    assert not decide(None, "site-a", own_fab, own.to_run_config()).allowed
    strict = kit_site(tmp_path / "strict", "site-b", allow_builtin_tasks=False)
    assert "built-in tasks are not allowed here" in decide(strict, "site-b", builtin_fab, {}).reason
    sneaky = {"task": "os-path"}  # another installed module by name: not a task here
    assert "refused task os-path: no such task" in decide(site_file, "site-a", builtin_fab, sneaky).reason

    app = read_app(rogue_app(tmp_path / "rogue", tmp_path / "out.json"))
    assert not app.is_kit_app and app.sha256 == read_app(tmp_path / "rogue").sha256  # a folder hashes the same
    assert "refused app rogue-app 1.0.0" in decide(site_file, "site-a", app, {}).reason
    built = subprocess.run([str(Path(sys.executable).with_name("flwr")), "build"], cwd=tmp_path / "rogue",
                           capture_output=True, text=True, timeout=120, check=False,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    fab = next((tmp_path / "rogue").glob("*.fab"))  # what `flwr build` writes: the same hash as the folder
    assert read_app(fab).sha256 == app.sha256 and candidate(fab).kind == "app"
    fab.unlink()
    approve(site_file.parent, candidate(fab.parent))
    assert decide(site_file, "site-a", app, {}).allowed
    with pytest.raises(FlowerbedError, match="needs no approval"):
        candidate(tmp_path / "manifest")
    shadow = tmp_path / "manifest" / "flowerbed" / "clientapp"  # the kit's app name, with code of its own
    shadow.mkdir(parents=True)
    (shadow / "app.py").write_text("app = None\n")
    posing = read_app(tmp_path / "manifest")
    assert posing.components["clientapp"] == KIT_CLIENTAPP and not posing.is_kit_app
    assert "refused app flowerbed-app" in decide(site_file, "site-a", posing, own.to_run_config()).reason

    gone = revoke(site_file.parent, "ct-triage")
    assert [g.sha256 for g in gone] == [digest] and not (site_file.parent / entry.file).exists()
    assert not decide(site_file, "site-a", own_fab, own.to_run_config()).allowed
    assert_clean_error(run_cli("supernode", "revoke", "nothing-here", "--kit", str(site_file.parent)),
                       ExitCode.ERROR, "nothing approved here matches 'nothing-here'")  # fmt: skip
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    assert_clean_error(run_cli("supernode", "approve", str(broken), "--yes", "--kit", str(site_file.parent)),
                       ExitCode.ERROR, "broken.whl is damaged")  # fmt: skip


@pytest.mark.federation
def test_run_app_refuses_flowerbeds_own_options(tmp_path: Path) -> None:
    layout = make_federation(tmp_path / "fed", make_config("app-options", SITES[:2]))
    app_dir = rogue_app(tmp_path / "rogue", tmp_path / "out.json")
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--app", str(app_dir), "--task", "tabular",
                               "--max-rounds", "3"), ExitCode.ERROR,
                       "--app runs the app's own ServerApp: leave out --task, --max-rounds (use --app-config)")  # fmt: skip
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--app-config", "x=1"), ExitCode.ERROR,
                       "--app-config goes with --app")  # fmt: skip
    assert_clean_error(run_cli("run", "-d", str(layout.root), "--app", str(tmp_path)), ExitCode.ERROR,
                       "is not a Flower App (no pyproject.toml)")  # fmt: skip


@pytest.mark.federation
def test_a_coordinators_own_app_runs_only_where_approved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASK_MARKER", "1")
    trace = tmp_path / "hooks.trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    a, b = SITES[:2]
    config = make_config("rogue", [a, b], min_nodes=1, max_rounds=1)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    kits = {site: kit_site(tmp_path / "kits" / site, site) for site in (a, b)}
    out = tmp_path / "replies.json"
    app_dir = rogue_app(tmp_path / "rogue", out)
    approved = run_cli("supernode", "approve", str(app_dir), "--yes", "--kit", str(kits[a].parent))
    assert approved.returncode == 0 and "approved app rogue-app 1.0.0" in " ".join(approved.stdout.split())
    digest = read_app(app_dir).sha256
    work = tmp_path / "work"
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {s: data.site_files[s] for s in (a, b)},
                              work, site_files=kits):  # fmt: skip
            ran = run_cli("run", "-d", str(layout.root), "--app", str(app_dir), "--name", "rogue",
                          "--timeout-s", "300", timeout=400)  # fmt: skip
            replies = json.loads(out.read_text())  # what the app's ServerApp received (the next run rewrites it)
            assert run_cli("supernode", "revoke", "rogue-app", "--kit", str(kits[a].parent)).returncode == 0
            nobody = run_cli("run", "-d", str(layout.root), "--app", str(app_dir), "--name", "refused-everywhere",
                             "--timeout-s", "300", timeout=400)  # fmt: skip
            reports: list[str] = []
            RunKeeper(layout, reports.append, control_port=config.superlink.internal_port).tick(startup=True)
    assert reports == []  # App runs, done: nothing to resume, nothing to name
    text = " ".join((nobody.stdout + nobody.stderr).split())
    assert_clean_error(nobody, ExitCode.RUN_FAILED, "no site trained (2 refusal(s), no result; the app's ServerApp "
                       "still said completed)", f"site {a} refused app rogue-app 1.0.0")  # fmt: skip
    assert f"site {b} refused app rogue-app 1.0.0" in text
    text = " ".join((ran.stdout + ran.stderr).split())
    assert ran.returncode == 0, text
    assert f"submitted app rogue-app 1.0.0 (sha256 {digest})" in text and "finished:completed" in text
    record = json.loads((layout.runs / "rogue" / "app-run.json").read_text())
    assert record["sha256"] == digest and record["kind"] == "app"
    assert (layout.runs / "rogue" / "serverapp.log").is_file()
    assert sorted(error for error, _ in replies) == [False, True], replies
    reason = next(r for error, r in replies if error)
    assert reason.startswith(f"site {b} refused app rogue-app 1.0.0 (sha256 {digest}): not approved here"), reason
    assert markers(work / a) and not markers(work / b)  # the refused app's code never ran at site b
    assert "REFUSED" in (work / b / "logs" / "supernode.log").read_text()
    # The refused app's loader was reached through the gate's wrappers (the canary of the gate's hooks).
    gate = {supernode.PULL_TASK, supernode.INSTALL_FAB, supernode.LOAD_APP, supernode.CLIENTAPP_CALL, compat.BUILD_FAB}
    assert {h.key for h in gate} <= traced(trace), traced(trace)
