"""`flowerbed app new`: a Flower App written offline runs with `flowerbed run --app` as written, at the sites
that approved it, and the run shows its rounds and metrics.

Real SuperLink, gateway and SuperNodes on loopback, real `flowerbed` commands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowerbed.demodata import make_demo_data
from flowerbed.errors import ExitCode
from tests.conftest import (
    SITES,
    assert_clean_error,
    coordinator,
    make_config,
    make_federation,
    run_cli,
    supervised_sites,
)
from tests.test_approval import kit_site


def test_an_app_name_is_checked_and_an_existing_folder_kept(tmp_path: Path) -> None:
    assert_clean_error(run_cli("app", "new", "My App", "--dir", str(tmp_path)), ExitCode.ERROR, "is not an app name")
    assert run_cli("app", "new", "my-app", "--dir", str(tmp_path)).returncode == 0
    assert_clean_error(run_cli("app", "new", "my-app", "--dir", str(tmp_path)), ExitCode.ERROR, "already exists")
    assert run_cli("app", "new", "x-app", "--api", "jax", "--dir", str(tmp_path)).returncode == 2


@pytest.mark.federation
def test_an_offline_app_runs_as_written_and_shows_its_rounds(tmp_path: Path) -> None:
    a, b = SITES[:2]
    config = make_config("apps", [a, b], min_nodes=2)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    kits = {site: kit_site(tmp_path / "kits" / site, site) for site in (a, b)}
    apps = {}
    for api in ("numpy", "pytorch"):
        made = run_cli("app", "new", f"{api}-study", "--api", api, "--dir", str(tmp_path / "apps"))
        assert made.returncode == 0, made.stdout + made.stderr
        apps[api] = tmp_path / "apps" / f"{api}-study"
        for site in (a, b):
            approved = run_cli("supernode", "approve", str(apps[api]), "--yes", "--kit", str(kits[site].parent))
            assert approved.returncode == 0, approved.stdout + approved.stderr
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {s: data.site_files[s] for s in (a, b)},
                              tmp_path / "work", site_files=kits):  # fmt: skip
            ran = {api: run_cli("run", "-d", str(layout.root), "--app", str(path), "--name", api, "--timeout-s", "300",
                                timeout=400) for api, path in apps.items()}  # fmt: skip
    for api, result in ran.items():
        text = " ".join((result.stdout + result.stderr).replace("│", " ").split())
        assert result.returncode == 0, text
        assert "finished:completed" in text and "3 round(s)" in text, text
        for n in (1, 2, 3):  # a row per round, with the aggregated train loss and evaluation accuracy
            assert re.search(rf" {n} \d\.\d{{4}} \d\.\d{{4}} \d\.\d{{4}} ", text), (api, text)
        assert "eval_acc" in text and "train_loss" in text
