"""Diagnoses that name the real cause: a site revoked or gone dark while a round waits for it.

Real SuperLink, gateway and SuperNodes on loopback; the site's SuperNode is frozen (SIGSTOP) so that
the round has to wait for it, as for a site that is still training, or a VM that stopped answering.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowerbed.config import FederationConfig, RunSettings
from flowerbed.demodata import make_demo_data
from flowerbed.layout import FederationLayout
from flowerbed.runfolder import read_rows
from flowerbed.runner import check_result, follow, submit
from flowerbed.supernode.supervisor import Supervisor
from tests.conftest import SITES, coordinator, make_config, make_federation, run_cli, supervised_sites, wait_for
from tests.faults import record

A, B = SITES[:2]
SILENT_S = 20.0  # the supervisor's silence threshold in these tests (60 s by default)


@contextmanager
def two_sites(
    tmp_path: Path, name: str, **run: object
) -> Iterator[tuple[FederationLayout, FederationConfig, Callable[[], None], dict[str, Supervisor]]]:
    """A coordinator and sites A and B, connected; ``freeze()`` stops B's SuperNode and executor (SIGSTOP).

    Everything frozen is continued and everything started is stopped on the way out.
    """
    config = make_config(name, [A, B], min_nodes=1, patience=10, **run)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    frozen: list[int] = []
    with coordinator(layout, config):
        with supervised_sites(layout, f"localhost:{config.superlink.port}", {s: data.site_files[s] for s in (A, B)},
                              tmp_path / "work") as sups:  # fmt: skip
            assert wait_for(lambda: all(s.connected for s in sups.values()), 120)

            def freeze() -> None:
                for proc in (sups[B].process, sups[B].executor):
                    if proc is not None:
                        os.kill(proc.pid, signal.SIGSTOP)
                        frozen.append(proc.pid)

            try:
                yield layout, config, freeze, sups
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)


@pytest.mark.federation
def test_a_site_revoked_mid_round_is_dropped_at_once_by_name(tmp_path: Path) -> None:
    with two_sites(tmp_path, "revoke", max_rounds=2, round_timeout_s=150) as (layout, config, freeze, _sups):
        freeze()  # B takes the task but never answers
        handle = submit(layout, RunSettings.model_validate(config.run.model_dump()), name="revoked-mid-round")
        time.sleep(8)  # round 1 is out, A has answered, B is frozen
        assert not any(r.get("kind") == "train" for r in read_rows(handle.out_dir))  # still waiting for B
        revoked = run_cli("certs", "revoke", B, "-d", str(layout.root))
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        at = time.monotonic()
        assert wait_for(lambda: any(r.get("kind") == "train" for r in read_rows(handle.out_dir)), 60)
        dropped_after = time.monotonic() - at
        result = follow(layout, handle, timeout_s=300)
        check_result(result, handle)
    first = next(r for r in result.rows if r["kind"] == "train")
    assert first["round"] == 1 and first["sites"] == [A], first
    line = f"site {B} was revoked by the coordinator (`flowerbed certs revoke`); dropped from this round"
    assert line in first["errors"], first
    assert dropped_after < 20, dropped_after  # not the 150 s round timeout
    assert all(r["sites"] == [A] for r in result.rows if r["kind"] == "train")
    record("a site revoked while a round waits for it", "the round went on without it at once: 'site inst-b was "
           "revoked by the coordinator'", injected="SuperNode frozen (SIGSTOP) mid-round, then `certs revoke`",
           noticed_s=dropped_after, rounds_lost=0, replies_lost=0)  # fmt: skip


@pytest.mark.federation
def test_a_site_gone_dark_mid_round_is_named_with_its_last_contact(tmp_path: Path) -> None:
    """A site that stops answering while a round waits for it is named within half a minute of its last contact."""
    with two_sites(tmp_path, "dark", max_rounds=1, round_timeout_s=70, site_absence_tolerance_s=1) as (
        layout,
        config,
        freeze,
        _sups,
    ):
        handle = submit(layout, RunSettings.model_validate(config.run.model_dump() | {"min_nodes": 2}), name="dark")
        freeze()  # B goes dark (a VM paused, a proxy gone)
        dark_at = time.monotonic()
        assert wait_for(lambda: any(r.get("kind") == "away" for r in read_rows(handle.out_dir)), 60)
        named_after = time.monotonic() - dark_at
        result = follow(layout, handle, timeout_s=300)
    away = next(r for r in result.rows if r["kind"] == "away")
    assert f"site {B} (node " in away["stop_reason"] and "no contact for" in away["stop_reason"], away
    age = int(away["stop_reason"].split("no contact for ")[1].split(" s")[0])
    assert 25 <= age <= 40, away  # measured from its last contact, not from when the round noticed
    assert named_after < 40, named_after
    assert "round 1 waits for it" in away["stop_reason"]
    # The round ended without B; B is named as away since its last contact (not "away 0 s" from when the round noticed).
    failed = next(r for r in result.rows if r["kind"] == "failed")
    away_s = int(failed["stop_reason"].split(f"site {B} (node")[-1].split(" away ")[1].split(" s")[0])
    assert away_s >= 40, failed["stop_reason"]  # Flower answers "Node Unavailable" after about a minute
    record("a site gone dark mid-round (no heartbeat, no pull)", "an 'away' row naming the site and the seconds "
           "since its last contact", injected="SuperNode frozen (SIGSTOP) right after the round went out",
           noticed_s=named_after, rounds_lost=0, replies_lost=0)  # fmt: skip


@pytest.mark.federation
def test_a_connected_but_silent_supernode_is_reported_by_its_supervisor(tmp_path: Path) -> None:
    """The SuperNode's pull loop and log stand still (the process frozen, the link up): said after ``silent_s``."""
    with two_sites(tmp_path, "silent", max_rounds=1) as (_layout, _config, _freeze, sups):
        supervisor = sups[B]
        lines: list[str] = []
        supervisor.report = lines.append
        supervisor.silent_s = SILENT_S  # a minute by default: the same check, scaled down
        old = supervisor.process
        assert old is not None
        os.kill(old.pid, signal.SIGSTOP)  # its loop stops turning, it logs nothing; the supervisor and link are fine
        frozen_at = time.monotonic()
        try:
            assert wait_for(lambda: any("has not asked the SuperLink for work" in line for line in lines), 120), lines
            noticed = time.monotonic() - frozen_at
        finally:
            os.kill(old.pid, signal.SIGCONT)
        assert wait_for(lambda: supervisor.connected, 60), lines  # it goes on where it stood
    line = next(line for line in lines if "has not asked the SuperLink for work" in line)
    assert "although connected and the link is up, and logged nothing" in line and "restart it" in line, line
    assert supervisor.process is old  # reported, not restarted: a slow push must not lose its reply
    assert SILENT_S - 10 <= noticed < SILENT_S + 30, noticed  # counted from its last log line, before the freeze
    record("a SuperNode connected but silent (its loop and log stood still)", "its supervisor said so after its "
           "silence threshold (60 s; 20 s here), with what to do",
           injected="SIGSTOP to flower-supernode only (supervisor and link up)",
           noticed_s=noticed)  # fmt: skip
