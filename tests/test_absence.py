"""A site that goes away mid-run: the round waits for it (bounded), and the run goes on or fails by name.

Real SuperLink, gateway and SuperNodes on loopback; the tolerance and timeouts are scaled down by
configuration so that each case takes about a minute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerbed.config import RunSettings, load_federation
from flowerbed.demodata import make_demo_data
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port
from flowerbed.runfolder import read_rows
from flowerbed.runner import check_result, follow, submit
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor
from tests.conftest import coordinator, make_config, make_federation, run_cli, wait_for
from tests.faults import record

SITES = ["site-a", "site-b", "site-c"]


class Site:
    """One SuperNode under its supervisor, in a thread, that can be stopped and started again."""

    def __init__(self, layout: FederationLayout, name: str, data: Path, work: Path, gateway: str) -> None:
        self.spec = SupernodeSpec(site=name, superlink=gateway, ca=layout.ca_cert, key=layout.node_key(name),
                                  data=data, workdir=work, port=free_port())  # fmt: skip
        self.supervisor: Supervisor | None = None
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> Site:
        self.stop_event = threading.Event()
        self.supervisor = Supervisor(self.spec, rejected_window_s=300, max_backoff_s=5)
        self.thread = threading.Thread(target=self.supervisor.run, args=(self.stop_event.is_set,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        assert self.supervisor is not None and self.supervisor.process is not None
        assert self.supervisor.process.poll() is not None

    @property
    def connected(self) -> bool:
        return self.supervisor is not None and self.supervisor.connected


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FederationLayout, dict[str, Site]]]:
    root = tmp_path_factory.mktemp("absence")
    layout = make_federation(root / "fed", make_config("absence", SITES[:2], min_nodes=2))
    data = make_demo_data(root / "data", SITES)
    gateway = f"localhost:{load_federation(layout.root).superlink.port}"
    with coordinator(layout):
        sites = {n: Site(layout, n, data.site_files[n], root / n, gateway).start() for n in SITES[:2]}
        try:
            assert wait_for(lambda: all(s.connected for s in sites.values()), 120)
            yield layout, sites
        finally:
            for site in sites.values():
                if not site.stop_event.is_set():
                    site.stop()


def settings_for(layout: FederationLayout, **extra: object) -> RunSettings:
    base = load_federation(layout.root).run.model_dump()
    return RunSettings.model_validate(
        # 200 local epochs (about 2 s of training per task): a site stopped right after round 1 has not
        # answered round 2 yet, however quick a round is otherwise.
        base
        | {
            "min_nodes": 2,
            "max_rounds": 3,
            "round_timeout_s": 20,
            "absence_retry_s": 3,
            "patience": 10,
            "local_epochs": 200,
        }
        | extra
    )


@pytest.mark.federation
def test_a_site_away_for_a_while_is_waited_for(federation: tuple[FederationLayout, dict[str, Site]]) -> None:
    layout, sites = federation
    handle = submit(layout, settings_for(layout, site_absence_tolerance_s=240), name="comes-back")
    # Round 1 trained (on a loaded machine its first try may time out and wait: a waiting row then
    # comes first, naming nodes whose site is not known yet).
    assert wait_for(lambda: any(r.get("kind") == "train" for r in read_rows(handle.out_dir)), 180)
    after_round_1 = len(read_rows(handle.out_dir))
    away_at = time.monotonic()
    sites["site-b"].stop()  # the VM reboots ...
    assert wait_for(lambda: any(r.get("kind") == "waiting" for r in read_rows(handle.out_dir)[after_round_1:]), 120)
    noticed = time.monotonic() - away_at
    sites["site-b"].start()  # ... and comes back
    back_at = time.monotonic()
    assert wait_for(lambda: sites["site-b"].connected, 240)
    rejoined = time.monotonic() - back_at
    result = follow(layout, handle, timeout_s=420)
    check_result(result, handle)
    rows = result.rows
    waiting = [r for r in rows[after_round_1:] if r["kind"] == "waiting"]
    assert waiting and "site site-b" in waiting[0]["stop_reason"] and "tolerance 240 s" in waiting[0]["stop_reason"]
    trained = [r["round"] for r in rows if r["kind"] == "train"]
    assert trained == [1, 2, 3]  # no round lost or repeated
    assert all(r["nodes"] == 2 for r in rows if r["kind"] == "train")
    record("a site away for a while (VM reboot)", "a waiting row naming the site, then the run went on",
           injected="site's SuperNode stopped after round 1, started again after the first waiting row",
           noticed_s=noticed, recovered_s=rejoined, rounds_lost=0, replies_lost=0)  # fmt: skip


@pytest.mark.federation
def test_a_site_away_too_long_fails_the_run_by_name(federation: tuple[FederationLayout, dict[str, Site]]) -> None:
    layout, sites = federation
    assert wait_for(lambda: sites["site-b"].connected, 240)
    handle = submit(layout, settings_for(layout, site_absence_tolerance_s=15), name="stays-away")
    assert wait_for(lambda: any(r.get("kind") == "train" for r in read_rows(handle.out_dir)), 180)
    sites["site-b"].stop()
    result = follow(layout, handle, timeout_s=300, poll_s=0.5)
    with pytest.raises(FlowerbedError) as info:
        check_result(result, handle)
    message = info.value.message
    assert "absent too long: site site-b" in message and " away " in message
    assert "node " in message  # the node id is given too, after the site's name
    assert any(r["kind"] == "waiting" for r in result.rows)


@pytest.mark.federation
def test_the_failed_run_is_resumed_by_hand_once_the_site_is_back(
    federation: tuple[FederationLayout, dict[str, Site]],
) -> None:
    layout, sites = federation
    handle_dir = layout.runs / "stays-away"
    failed_at = [r["round"] for r in read_rows(handle_dir) if r["kind"] == "failed"]
    assert failed_at, read_rows(handle_dir)
    back = time.monotonic()
    sites["site-b"].start()
    assert wait_for(lambda: sites["site-b"].connected, 240)
    rejoined = time.monotonic() - back
    # As the coordinator would type it.
    result = run_cli("run", "--resume", "stays-away", "-d", str(layout.root), "--max-rounds", "3", timeout=400)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text
    assert "resumed run stays-away as Flower run" in text and "stopped: max-rounds after 3 rounds" in text
    rows = read_rows(handle_dir)
    assert [r["round"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # the failed round trained once
    resumed = [r for r in rows if r["kind"] == "resumed"]
    assert len(resumed) == 1 and "resumed by hand" in resumed[0]["stop_reason"]
    assert "round 1's checkpoint" in resumed[0]["stop_reason"]
    assert rows[-1]["kind"] == "final-eval"
    record("a site away longer than the tolerance", "the run failed naming the site; `flowerbed run --resume` "
           "went on from the last checkpoint once it was back", injected="site stopped (VM shut down) for minutes",
           noticed_s=None, recovered_s=rejoined, rounds_lost=0, replies_lost=0)  # fmt: skip
