"""Differential privacy that each site sets and enforces: DP-SGD with Opacus under a site's budget.

In-process: the ledger's epsilon against an independent accountant (Google's dp-accounting), the
stricter-of rule, refusal past the budget, persistence across processes. Then a real federation
whose sites start from their kits' site.toml: a site with a small budget stops while the others go
on, and the run ends cleanly once too few sites can train.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch.utils.data import TensorDataset

from flowerbed import audit
from flowerbed.clientapp.privacy import (
    Budget,
    BudgetSpentError,
    Ledger,
    PrivateTraining,
    effective_budget,
    epsilon_spent,
    node_config_of,
    site_privacy,
)
from flowerbed.clientapp.task import make_model, train
from flowerbed.config import RunSettings, SitePrivacy
from flowerbed.deploy.kit import build_kits
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.probes import free_port
from flowerbed.runner import check_result, follow, submit
from flowerbed.serverapp.criteria import PRIVACY_SPENT
from flowerbed.serverapp.strategies import client_dp_warning, make_strategy
from flowerbed.supernode.sitekit import site_spec
from flowerbed.supernode.supervisor import Supervisor
from flowerbed.warmexec import LEARNED_EVENT
from tests.conftest import SITES, RunningFederation, assert_clean_error, run_cli, wait_for


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon by Google's dp-accounting RDP accountant (not Opacus), for the same Poisson-sampled steps."""
    accountant = RdpAccountant()
    for noise, rate, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return float(accountant.get_epsilon(delta))


def toy_data(n: int = 250) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


def private(folder: Path, budget: Budget, server_round: int, max_rounds: int = 3) -> PrivateTraining:
    return PrivateTraining("site-x", budget, folder, "run-test", 1, server_round, max_rounds)


def test_the_accountants_agree_with_the_published_figures() -> None:
    """250 patients, batch 16, 300 steps, noise 1.0: Opacus RDP 8.39, PRV 7.58; dp-accounting RDP 8.39."""
    history = [(1.0, 16 / 250, 300)]
    assert epsilon_spent(history, 1e-5, "rdp") == pytest.approx(8.39, abs=0.01)
    assert epsilon_spent(history, 1e-5, "prv") == pytest.approx(7.58, abs=0.02)
    assert independent_epsilon(history, 1e-5) == pytest.approx(8.39, abs=0.01)


def test_dp_sgd_spends_within_the_budget_and_then_refuses(tmp_path: Path) -> None:
    """Three rounds of real DP-SGD, each in a new PrivateTraining (as each task process is): the noise
    is calibrated so that the budget lasts max_rounds, the spending matches dp-accounting within 5%,
    and a fourth round is refused with the site, its budget and what it spent."""
    budget = Budget(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, noise_multiplier=None)
    model = make_model("mlp", num_features=10, num_classes=2, hidden_units=16, image_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    spent = []
    for server_round in (1, 2, 3):
        dp = private(tmp_path, budget, server_round)
        train(model, toy_data(), epochs=2, batch_size=16, learning_rate=0.01, private=dp)
        assert dp.spent is not None
        spent.append(dp.spent)
    assert spent == sorted(spent) and spent[-1] == pytest.approx(3.0, rel=0.01)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ledger = Ledger.load(tmp_path, "run-test")
    assert [r["round"] for r in ledger.rounds] == [1, 2, 3]
    assert independent_epsilon(ledger.history, 1e-5) == pytest.approx(spent[-1], rel=0.05)
    with pytest.raises(BudgetSpentError) as refused:
        train(model, toy_data(), epochs=2, batch_size=16, learning_rate=0.01, private=private(tmp_path, budget, 4))
    message = str(refused.value)
    assert "site site-x: privacy budget spent" in message and "of epsilon 3 (delta 1e-05)" in message
    assert "used in 3 round(s)" in message
    assert len(Ledger.load(tmp_path, "run-test").rounds) == 3  # a refused round spends nothing


def test_the_spending_survives_a_new_process(tmp_path: Path) -> None:
    """The ledger is the state: another interpreter (as after a SuperNode restart) sees the same spending."""
    budget = Budget(epsilon=8.0, delta=1e-5, max_grad_norm=1.0, noise_multiplier=1.5)
    first = private(tmp_path, budget, 1).reserve(0.1, 50)
    code = (
        "from pathlib import Path; from flowerbed.clientapp.privacy import Budget, PrivateTraining;"
        f"b = Budget(8.0, 1e-5, 1.0, 1.5); p = PrivateTraining('site-x', b, Path({str(tmp_path)!r}), 'run-test', 1, 2, 3);"
        "print(p.spent_so_far()[0]); print(p.reserve(0.1, 50))"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(lines[0]) == pytest.approx(first)
    assert float(lines[1]) > first
    assert independent_epsilon([(1.5, 0.1, 100)], 1e-5) == pytest.approx(float(lines[1]), rel=0.05)


def test_an_unreadable_ledger_is_never_taken_as_nothing_spent(tmp_path: Path) -> None:
    (tmp_path / "run-test.json").write_text("{not json")
    with pytest.raises(FlowerbedError, match="unreadable"):
        private(tmp_path, Budget(1.0, 1e-5, 1.0, 1.0), 1).reserve(0.1, 10)


def test_the_run_asks_but_never_loosens_a_site_budget(tmp_path: Path) -> None:
    site = SitePrivacy(epsilon=2.0, delta=1e-6, max_grad_norm=0.5)
    config = node_config_of(site, tmp_path)
    assert site_privacy(config) == site  # what the supervisor writes is what the ClientApp reads
    assert site_privacy(node_config_of(None, tmp_path)) is None
    off = RunSettings.model_validate({})
    assert effective_budget(None, off) is None
    loose = RunSettings.model_validate({"dp": "sample", "dp_epsilon": 50, "dp_delta": 1e-3, "dp_max_grad_norm": 5})
    combined = effective_budget(site, loose)
    assert combined is not None
    assert (combined.epsilon, combined.delta, combined.max_grad_norm, combined.source) == (2.0, 1e-6, 0.5, "site+run")
    strict = effective_budget(site, loose.model_copy(update={"dp_epsilon": 0.5}))
    assert strict is not None and strict.epsilon == 0.5
    only_run = effective_budget(None, loose)
    assert only_run is not None and (only_run.epsilon, only_run.source) == (50, "run")
    assert effective_budget(site, off) is not None  # the site's budget holds whatever the run says


def test_client_level_dp_with_few_sites_is_warned_about() -> None:
    client = RunSettings.model_validate({"dp": "client", "min_nodes": 2})
    warning = client_dp_warning(client, 5)
    assert warning is not None and "5 site(s)" in warning and "51.4%" in warning and "dp = sample" in warning
    assert client_dp_warning(client, 25) is None
    assert client_dp_warning(RunSettings.model_validate({"dp": "sample"}), 3) is None
    assert type(make_strategy(client)).__name__ == "DifferentialPrivacyServerSideFixedClipping"


def kit_folder(running: RunningFederation, site: str, dest: Path, privacy: str) -> Path:
    """The site's real kit, unpacked, with its data path and its own [privacy] section in site.toml."""
    with tarfile.open(running.layout.root / "kits" / f"{site}.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    folder = dest / site
    toml = (folder / "site.toml").read_text()
    toml = toml.replace(
        'data_path = "CHANGE-ME: /path/to/your/data.csv or image folder"',
        f'data_path = "{running.data.site_files[site]}"',
    )
    (folder / "site.toml").write_text(toml + privacy)
    return folder


@pytest.mark.federation
@pytest.mark.parametrize("secure", ["off", "secagg+"])
def test_a_site_out_of_budget_stops_while_the_others_go_on(
    running: RunningFederation, tmp_path: Path, secure: str
) -> None:
    """inst-a allows epsilon 1.6 and inst-b 2.3 (both with noise 2.0: about 1.4, 1.84, 2.19, 2.49 after
    rounds 1-4 on their 137 examples); univ-hospital sets nothing, and the run asks for DP-SGD with
    epsilon 20, which the other two cannot loosen. inst-a trains round 1 and refuses round 2; inst-b
    trains rounds 1-3 and refuses round 4, when only one site could go on: the run ends there, cleanly.

    Under secure aggregation a refusal comes at SecAgg+'s masking stage, after the keys were shared:
    the refusing site counts as dropped out, its masks are removed with the others' shares of its key,
    and in round 4 (one site left to mask) the protocol stops and the run ends for the same reason."""
    build_kits(running.layout, running.config, SITES)
    budgets = {
        "inst-a": "\n[privacy]\nepsilon = 1.6\nnoise_multiplier = 2.0\n",
        "inst-b": "\n[privacy]\nepsilon = 2.3\nnoise_multiplier = 2.0\n",
        "univ-hospital": "",
    }
    stop = threading.Event()
    folders = {site: kit_folder(running, site, tmp_path / "kits", privacy) for site, privacy in budgets.items()}
    if secure != "off":  # univ-hospital trains only under secure aggregation: it does here
        toml = folders["univ-hospital"] / "site.toml"
        toml.write_text(
            toml.read_text().replace("require_secure_aggregation = false", "require_secure_aggregation = true")
        )
    sups = {site: Supervisor(site_spec(folder, port=free_port(), threads=1)) for site, folder in folders.items()}
    assert sups["univ-hospital"].spec.secure_only == (secure != "off")
    threads = [threading.Thread(target=s.run, args=(stop.is_set,), daemon=True) for s in sups.values()]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        settings = RunSettings.model_validate(
            running.config.run.model_dump()
            | {"min_nodes": 2, "max_rounds": 8, "patience": 20, "node_wait_s": 120, "dp": "sample", "dp_epsilon": 20,
               "secure_aggregation": secure}
        )  # fmt: skip
        handle = submit(running.layout, settings, name="privacy" if secure == "off" else "privacy-secagg")
        result = follow(running.layout, handle, timeout_s=400)
        check_result(result, handle)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    trained = [r for r in result.rows if r["kind"] == "train"]
    assert [r["round"] for r in trained] == [1, 2, 3]
    assert [sorted(r["sites"]) for r in trained] == [
        sorted(SITES),
        ["inst-b", "univ-hospital"],
        ["inst-b", "univ-hospital"],
    ]
    assert [sorted(r["privacy"]) for r in trained] == [sorted(SITES)] * 3  # each site's epsilon, each round
    assert trained[0]["privacy"]["inst-a"] == pytest.approx(1.406, abs=0.01)
    assert trained[2]["privacy"]["inst-b"] == pytest.approx(2.188, abs=0.01)
    assert all(r["privacy"]["univ-hospital"] <= 20 for r in trained)
    refusal = next(e for e in trained[1]["errors"] if "inst-a" in e)
    assert "site inst-a: privacy budget spent: 1.406 of epsilon 1.6 (delta 1e-05) used in 1 round(s)" in refusal
    stopped = [r for r in result.rows if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["round"] == 4 and PRIVACY_SPENT in stopped[0]["stop_reason"]
    assert "inst-a, inst-b" in stopped[0]["stop_reason"] and "1 site(s) can go on" in stopped[0]["stop_reason"]
    assert result.rows[-1]["kind"] == "final-eval" and result.rows[-1]["eval_loss"] is not None
    summary = json.loads((handle.out_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stop_reason"] == PRIVACY_SPENT
    assert summary["privacy"]["inst-b"] == pytest.approx(2.188, abs=0.01)
    # Each site's ledger (in its work folder) against the independent accountant.
    for site in ("inst-a", "inst-b", "univ-hospital"):
        ledgers = list((sups[site].spec.workdir / "privacy").glob("run-privacy-*.json"))
        assert len(ledgers) == 1, ledgers
        ledger = json.loads(ledgers[0].read_text())
        assert independent_epsilon([tuple(h) for h in ledger["history"]], 1e-5) == pytest.approx(
            summary["privacy"][site], rel=0.05
        )
    shown = run_cli("supernode", "privacy", "--kit", str(tmp_path / "kits" / "inst-a"), env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "inst-a spends at most epsilon 1.6 (delta 1e-05) per run" in shown.stdout
    assert "1.406" in shown.stdout and "site+run" in shown.stdout
    log = sups["inst-a"].log_path.read_text()
    assert "round 2: train task REFUSED: site inst-a: privacy budget spent" in log
    assert "DP-SGD: epsilon 1.406 of 1.6 spent" in log
    # Opacus: imported up front by the sites with their own budget; by the other after its first DP-SGD task.
    assert "ClientApp executor ready" in log and "torch, opacus, flwr" in log
    other = sups["univ-hospital"].log_path.read_text()
    assert "ClientApp executor ready" in other and "torch, flwr" in other and "torch, opacus" not in other
    assert f"{LEARNED_EVENT} opacus" in other
    check_audit_trails(running, tmp_path / "kits", handle.out_dir.name, handle.run_id)


def check_audit_trails(running: RunningFederation, kits: Path, run: str, run_id: int) -> None:
    """What the run left in the coordinator's and the sites' audit trails, and that both verify."""
    site_trail = audit.read(kits / "inst-a" / "supernode-work" / "audit.jsonl")
    kinds = [e["kind"] for e in site_trail]
    assert audit.CONNECTED in kinds and audit.TASK in kinds
    allowed = [e for e in site_trail if e["kind"] == audit.TASK and e["details"]["run_id"] == run_id]
    assert allowed and all(e["details"]["allowed"] for e in allowed)
    rounds = [e["details"] for e in site_trail if e["kind"] == audit.ROUND and e["details"]["run_id"] == run_id]
    sent = [d for d in rounds if d.get("update_sha256")]
    assert len(sent) == 1 and sent[0]["round"] == 1 and sent[0]["epsilon"] == pytest.approx(1.406, abs=0.01)
    assert sent[0]["update_bytes"] > 0 and len(sent[0]["update_sha256"]) == 64
    assert any("privacy budget spent" in d.get("refused", "") for d in rounds)
    coordinator = audit.read(running.layout.audit)
    runs = [e["details"] for e in coordinator if e["kind"] == audit.RUN and e["details"].get("run") == run]
    assert [r["event"] for r in runs] == ["submitted", "ended"] and runs[1]["stop_reason"] == PRIVACY_SPENT
    trained = [e["details"] for e in coordinator if e["kind"] == audit.ROUND and e["details"]["run"] == run]
    assert [d["round"] for d in trained if d["kind"] == "train"] == [1, 2, 3]
    first = trained[0]
    assert sorted(first["sites"]) == sorted(SITES) and set(first["site_audit_heads"]) == set(SITES)
    # The coordinator holds each site's trail head: the site's own event for that round is that head.
    seq, digest = first["site_audit_heads"]["inst-a"].split(":")
    assert site_trail[int(seq) - 1]["hash"] == digest and site_trail[int(seq) - 1]["details"]["round"] == 1
    anchored = [e["details"] for e in coordinator if e["kind"] == audit.GATEWAY]
    assert anchored and "127.0.0.1" in anchored[-1]["clients"]
    for args in (["-d", str(running.layout.root)], ["--kit", str(kits / "inst-a")]):
        verified = run_cli("audit", "verify", *args)
        assert verified.returncode == 0 and "the chain is intact" in verified.stdout, verified.stderr
    # An anchored line of the gateway's access log changed afterwards: named, with the lines.
    access = running.layout.gateway_access_log
    original = access.read_bytes()
    try:
        access.write_bytes(original.replace(b"POST", b"GET ", 1))
        assert_clean_error(run_cli("audit", "verify", "-d", str(running.layout.root)), ExitCode.ERROR,
                           "were changed after event", "the audit trail itself is intact")  # fmt: skip
    finally:
        with access.open("r+b") as handle:  # nginx keeps appending to the same file
            head = handle.read(len(original))
            handle.seek(0)
            handle.write(original[: len(head)])
