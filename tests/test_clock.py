"""A site clock that drifts after the SuperNode started: the site console says "clock drift", with the offset.

The SuperNode and its supervisor (`flowerbed supernode start`, a real subprocess) run under
libfaketime, whose offset the test moves from +0 s to +10 s after the node connected and back
again: Flower refuses a node more than 5 s ahead (HTTP 401) and ends it as if Ctrl-C was pressed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowerbed.demodata import make_demo_data
from flowerbed.probes import free_port
from tests.conftest import SITES, coordinator, make_config, make_federation, wait_for
from tests.faults import record
from tests.procs import group_members


def faketime_library() -> str:
    found = sorted(str(p) for p in Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: `bash scripts/setup.sh --dev` installs it (apt-get install libfaketime)"
    return found[0]


@pytest.mark.federation
def test_a_clock_that_drifts_after_start_is_named_with_its_offset(tmp_path: Path) -> None:
    config = make_config("clock", SITES[:1], min_nodes=1)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    env = {
        **os.environ, "COLUMNS": "200", "NO_COLOR": "1",
        "LD_PRELOAD": faketime_library(), "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_CACHE_DURATION": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "1",
    }  # fmt: skip
    out_path = tmp_path / "site.out"
    site = None
    with coordinator(layout, config), contextlib.ExitStack() as cleanup:
        cleanup.callback(_stop_site, lambda: site)
        with out_path.open("w") as out:
            site = subprocess.Popen(
                [str(Path(sys.executable).parent / "flowerbed"), "supernode", "start",
                 "--superlink", f"localhost:{config.superlink.port}", "--ca", str(layout.ca_cert),
                 "--key", str(layout.node_key(SITES[0])), "--data", str(data.site_files[SITES[0]]),
                 "--workdir", str(tmp_path / "work"), "--port", str(free_port())],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        text = lambda: " ".join(out_path.read_text().split())  # noqa: E731
        assert wait_for(lambda: "connected to" in text(), 120), text()
        pids = [int(line.split("(pid ")[1].split(")")[0]) for line in text().split("started flower-supernode")[1:]]
        first_group = pids[0]

        offset_file.write_text("+10s\n")  # the VM's clock jumps 10 s ahead
        drifted = time.monotonic()
        assert wait_for(lambda: "clock drift" in text(), 120), text()
        noticed = time.monotonic() - drifted
        said = text().split("clock drift: ")[1]
        assert said.startswith("this VM's clock is 1") and "s ahead of the SuperLink's (measured +1" in said, said
        assert "sync it with NTP" in said
        assert "restarting in" not in text().split("clock drift")[0].split("connected to")[-1]
        assert group_members(first_group) == []  # no orphaned flower-superexec of the ended SuperNode

        offset_file.write_text("+0\n")  # NTP puts it right
        fixed = time.monotonic()
        assert wait_for(lambda: text().count("connected to") >= 2, 60), text()
        # The offset is measured from the gateway's Date header (whole seconds): within a second of 0.
        assert re.search(r"the clock is right again \([+-][01]\.\d s against the SuperLink\)", text()), text()
        assert "refuses this node" not in text()  # its old session was signed off: accepted at once
        record("a site clock drifting +10 s after start", '"clock drift: this VM\'s clock is 10 s ahead of the '
               'SuperLink\'s (measured +10 s) ... sync it with NTP"; connected again once the clock was right',
               injected="libfaketime offset of the site's processes moved from +0 s to +10 s, later back",
               noticed_s=noticed, recovered_s=time.monotonic() - fixed, rounds_lost=0, replies_lost=0)  # fmt: skip
    assert site is not None and site.returncode == 0


def _stop_site(get: Callable[[], subprocess.Popen[bytes] | None]) -> None:
    """SIGTERM to the site's `flowerbed supernode start`, SIGKILL to its group if it has not ended in 60 s."""
    site = get()
    if site is None:
        return
    try:
        site.send_signal(signal.SIGTERM)
        site.wait(timeout=60)
    finally:
        if site.poll() is None:
            os.killpg(site.pid, signal.SIGKILL)
