"""Runs through the real gateway with node auth: min-nodes failure, `flowerbed run` to a stop criterion."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flowerbed.config import RunSettings
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.probes import free_port
from flowerbed.runner import check_result, follow, submit
from flowerbed.superlink import flwrcli
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor
from flowerbed.task import load_task
from tests.conftest import RunningFederation, assert_clean_error, make_config, make_federation, run_cli, wait_for
from tests.faults import record
from tests.procs import alive

SITE_REPORTS: dict[str, list[str]] = {}  # what each site's console showed


@pytest.fixture(scope="module")
def nodes(running: RunningFederation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Supervisor]]:
    """inst-a and inst-b with good data; univ-hospital pointed at a data path that does not exist."""
    root = tmp_path_factory.mktemp("nodes")
    data = dict(running.data.site_files)
    data["univ-hospital"] = root / "missing" / "data.csv"
    stop = threading.Event()
    supervisors, threads = [], []
    for site, path in data.items():
        spec = SupernodeSpec(site=site, superlink=running.gateway, ca=running.layout.ca_cert,
                             key=running.layout.node_key(site), data=path, workdir=root / site,
                             port=free_port())  # fmt: skip
        sup = Supervisor(spec, report=SITE_REPORTS.setdefault(site, []).append)
        supervisors.append(sup)
        threads.append(threading.Thread(target=sup.run, args=(stop.is_set,), daemon=True))
        threads[-1].start()
    try:
        yield supervisors
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for sup in supervisors:
            assert sup.process is not None and sup.process.poll() is not None


@pytest.mark.federation
def test_run_fails_when_fewer_than_min_nodes_reply(running: RunningFederation, nodes: list[Supervisor]) -> None:
    settings = RunSettings.model_validate(
        running.config.run.model_dump() | {"min_nodes": 3, "max_rounds": 3, "node_wait_s": 60}
    )
    handle = submit(running.layout, settings, name="too-few")
    result = follow(running.layout, handle, timeout_s=240, poll_s=0.5)
    seen_failed = time.time()
    # A failure the ServerApp decided reaches the user at once, not when Flower's heartbeat expires
    # (about a minute later): summary.json is written the moment the ServerApp decides.
    decided = (handle.out_dir / "summary.json").stat().st_mtime
    assert result.status == "finished:failed"
    assert seen_failed - decided < 5, f"{seen_failed - decided:.1f} s from decision to status"
    with pytest.raises(FlowerbedError) as info:
        check_result(result, handle)
    assert info.value.exit_code == ExitCode.RUN_FAILED
    assert "round 1: 2 valid replies, min-nodes is 3" in info.value.message
    assert "site univ-hospital" in info.value.message and "does not exist" in info.value.message
    assert result.summary["status"] == "failed"
    assert not result.status.endswith(":completed")
    assert result.rows[0]["stop_reason"].startswith("failed:")


@pytest.mark.federation
def test_flowerbed_run_cli_reaches_max_rounds(
    running: RunningFederation, nodes: list[Supervisor], tmp_path: Path
) -> None:
    """As a coordinator runs it: from a home folder that holds a `flowerbed/` clone, with a relative -d."""
    home = tmp_path / "home"
    clone = home / "flowerbed"
    clone.mkdir(parents=True)
    (clone / "pyproject.toml").write_text('[project]\nname = "flowerbed"\n')  # what `git clone` leaves
    fed = home / "fed"
    fed.symlink_to(running.layout.root)
    result = run_cli(
        "run", "-d", "fed", "--strategy", "fedprox", "--proximal-mu", "0.1",
        "--max-rounds", "2", "--min-nodes", "2", "--name", "cli-run", timeout=400, cwd=home,
    )  # fmt: skip
    text = result.stdout + result.stderr
    flat = " ".join(text.split())
    assert result.returncode == 0, text
    assert "stopped: max-rounds after 2 rounds" in flat
    assert "round 0" not in flat
    # The sites that answered (not univ-hospital, whose data path is missing) made the feature scaling.
    assert "features standardized with the mean and std of" in flat and "training examples at 2 sites" in flat
    out = running.layout.runs / "cli-run"
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["round"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (3, "final-eval")]
    assert all(r["nodes"] == 2 and r["failures"] == 1 for r in rows)  # the bad site keeps failing
    assert rows[0]["errors"][0].startswith("site univ-hospital") and "does not exist" in rows[0]["errors"][0]
    assert rows[1]["stop_reason"] == "max-rounds"
    assert rows[2]["stop_reason"] == "evaluation of the last model" and rows[2]["eval_accuracy"] is not None
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:9] == [
        "round",
        "kind",
        "nodes",
        "failures",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "seconds",
        "stop_reason",
    ]
    metrics = {k.replace("-", "_") for r in rows for k in r["metrics"]}
    assert metrics <= set(header) and len(header) == len(set(header)), header  # every metric, each once
    assert lines[-1].startswith(",final-eval,"), lines[-1]  # the final evaluation is no round
    for name in ("final_model.pt", "metrics.png", "summary.json", "checkpoints/round-0002.pt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["strategy"] == "fedprox"
    # The table: seconds with one decimal, the final evaluation as its own row named "final".
    assert re.search(r"│ final │ 2 │ 1 │ - │ - │ \d\.\d{4} │ \d\.\d{4} │ \d+\.\d │ evaluation of the last model", flat)
    assert not re.search(r"│ \d+\.\d{4} │ (max-rounds|evaluation)", flat)
    where = "the final evaluation (after round 2)" if summary["best_round"] == 3 else f"round {summary['best_round']}"
    assert summary["best_model"] == where and summary["target_metric"] == "accuracy"
    assert summary["best_target_value"] == summary["best_eval_accuracy"] == summary["best_metrics"]["accuracy"]
    assert f"best accuracy {summary['best_eval_accuracy']:.4f} ({where})" in flat  # the metric that drove it


@pytest.mark.federation
def test_run_with_the_superlink_stopped_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    config = make_config("stopped")
    layout = make_federation(tmp_path / "fed", config)
    result = run_cli("run", "-d", str(layout.root), "--name", "first", cwd=tmp_path)
    assert_clean_error(result, 1, "was never started: start it with `flowerbed superlink start -d")
    flwrcli.write_connection(layout.flwr_home, f"127.0.0.1:{config.superlink.internal_port}", layout.ca_cert)
    for _ in range(2):  # the same --name again: nothing was left behind by the first try
        result = run_cli("run", "-d", "fed", "--name", "first", cwd=tmp_path)
        assert_clean_error(
            result, 1, f"the SuperLink is not running (nothing answers on 127.0.0.1:{config.superlink.internal_port})"
        )
        assert not (layout.runs / "first").exists()


@pytest.mark.federation
@pytest.mark.parametrize("strategy", ["fedadam", "fedmedian"])
def test_other_strategies_aggregate(running: RunningFederation, nodes: list[Supervisor], strategy: str) -> None:
    settings = RunSettings.model_validate(
        running.config.run.model_dump()
        | {"strategy": strategy, "max_rounds": 2, "min_nodes": 2, "keep_checkpoints": 1, "patience": 5}
    )
    handle = submit(running.layout, settings, name=f"strategy-{strategy}")
    result = follow(running.layout, handle, timeout_s=240)
    check_result(result, handle)
    assert result.summary["settings"]["strategy"] == strategy
    assert result.rows[0]["nodes"] == 2 and result.rows[0]["train_loss"] is not None
    # Checkpoints: the last N (here 1) and the best; the final model is the best trained one,
    # never the initial model that round 1 evaluated.
    checkpoints = handle.out_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "round-0002.pt"]
    best = torch.load(checkpoints / "best.pt")
    assert best["round"] == result.summary["best_round"] >= 2
    final = torch.load(handle.out_dir / "final_model.pt")
    assert final.keys() == best["state_dict"].keys()
    assert all(torch.equal(final[k], best["state_dict"][k]) for k in final)
    torch.manual_seed(settings.seed)
    initial = load_task("tabular").model(settings).state_dict()
    assert not all(torch.equal(final[k], initial[k]) for k in final)


@pytest.mark.federation
def test_error_replies_do_not_crash_the_supernode(nodes: list[Supervisor]) -> None:
    bad = nodes[2]
    assert bad.spec.site == "univ-hospital"
    assert bad.process is not None and bad.process.poll() is None
    assert bad.restarts == 0
    assert bad.connected


@pytest.mark.federation
def test_each_site_sees_its_own_tasks_and_failures(nodes: list[Supervisor]) -> None:
    """On the site: each task with its round, what failed on its data and why; a timestamped log."""
    bad = SITE_REPORTS["univ-hospital"]
    assert any(m.startswith("connected to ") and " as node " in m for m in bad)
    assert any(re.fullmatch(r"round 1: received a train task", m) for m in bad), bad
    failed = [m for m in bad if "train task FAILED on this site's data" in m]
    assert failed and "does not exist" in failed[0] and re.match(r"round \d+: ", failed[0])
    good = SITE_REPORTS["inst-a"]
    assert any(
        re.fullmatch(
            r"round \d+: trained on \d+ examples; the global model scored accuracy [\d.]+ on \d+ local validation "
            r"examples; sent an update of [\d.]+ kB \(sha256 [0-9a-f]{12}\)",
            m,
        )
        for m in good
    ), good
    assert not any("FAILED" in m for m in good)
    lines = nodes[2].log_path.read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines)


@pytest.mark.federation
def test_invalid_run_options_are_refused_before_submission(running: RunningFederation) -> None:
    result = run_cli(
        "run", "-d", str(running.layout.root), "--strategy", "fedprox", "--max-rounds", "1", "--name", "refused"
    )  # fmt: skip
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "proximal_mu > 0" in result.stderr and "Traceback" not in result.stderr
    assert not (running.layout.runs / "refused").exists()
    result = run_cli("run", "-d", str(running.layout.root), "--min-nodes", "4", "--name", "refused")
    assert_clean_error(result, ExitCode.INVALID_CONFIG, "run.min_nodes is 4 but only 3 sites are listed")
    assert not (running.layout.runs / "refused").exists()


@pytest.mark.federation
def test_killed_supernode_is_restarted_and_rejoins_at_once(nodes: list[Supervisor]) -> None:
    """SIGKILL the SuperNode: the supervisor signs the dead session off at the SuperLink (Flower would
    refuse the restarted node for about a minute otherwise), restarts it, and the node rejoins."""
    sup = nodes[0]
    assert wait_for(lambda: sup.connected, 120)
    assert sup.process is not None
    old_pid = sup.process.pid
    assert sup.executor is not None and sup.executor.pid is not None  # the warm executor, beside it
    old_executor = sup.executor.pid
    log_before = len(Path(sup.log_path).read_text())
    killed = time.monotonic()
    os.killpg(old_pid, signal.SIGKILL)
    wait_for(lambda: sup.restarts >= 1 and sup.connected, 120)
    rejoined = time.monotonic() - killed
    assert sup.restarts >= 1
    assert sup.connected, Path(sup.log_path).read_text()[-2000:]
    assert sup.process.pid != old_pid
    # A new warm executor came with the new SuperNode; the old one is gone (not left polling a dead API).
    assert sup.executor is not None and sup.executor.pid not in (None, old_executor)
    assert old_executor is None or not alive(old_executor)
    assert any(re.fullmatch(r"flower-supernode ended with status -9 without signing off; signed node \d+ off at "
                            r"the SuperLink, so it may rejoin at once", m) for m in SITE_REPORTS[sup.spec.site]), \
        SITE_REPORTS[sup.spec.site]  # fmt: skip
    assert "Failed to activate SuperNode" not in Path(sup.log_path).read_text()[log_before:]  # not refused
    assert rejoined < 30, f"{rejoined:.0f} s"
    record("kill -9 one SuperNode, restarted by its supervisor", "a sign-off line, then connected again",
           injected="SIGKILL to flower-supernode's process group", noticed_s=None, recovered_s=rejoined,
           rounds_lost=0, replies_lost=0)  # fmt: skip


@pytest.mark.federation
def test_a_held_out_test_split_is_reported_with_intervals(running: RunningFederation, nodes: list[Supervisor]) -> None:
    """test_fraction holds a share of each site's validation data out of training and model selection; the
    final model is evaluated on it once, with a 95% bootstrap interval per site and Wilson's for the pool."""
    result = run_cli("run", "-d", str(running.layout.root), "--max-rounds", "2", "--min-nodes", "2", "--name",
                     "held-out", "--test-fraction", "0.4", timeout=400)  # fmt: skip
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    flat = " ".join(text.replace("│", " ").split())
    assert "held-out test of the final model (95% intervals)" in flat and "all sites (pooled)" in flat, flat
    out = running.layout.runs / "held-out"
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    held = rows[-1]
    assert held["kind"] == "held-out" and rows[-2]["kind"] == "final-eval", [r["kind"] for r in rows]
    sites = {s: m for s, m in held["per_site"].items() if m.get("num-test")}
    assert set(sites) == {"inst-a", "inst-b"}, held  # univ-hospital has no data at all: its error is named
    assert any("univ-hospital" in e for e in held["errors"]), held["errors"]
    for figures in sites.values():
        assert figures["test-accuracy-lo"] <= figures["test-accuracy"] <= figures["test-accuracy-hi"], figures
        assert figures["test-loss-lo"] <= figures["test-loss"] <= figures["test-loss-hi"], figures
    pooled = held["metrics"]
    assert pooled["num-test"] == sum(m["num-test"] for m in sites.values())
    assert pooled["test-accuracy-lo"] < pooled["test-accuracy"] < pooled["test-accuracy-hi"]
    validation = [r for r in rows if r["kind"] == "train"]
    assert all(r["nodes"] == 2 for r in validation)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"]["pooled"] == pooled
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert "test_accuracy" in header and "test_accuracy_lo" in header
