"""CKKS encrypted aggregation: the coordinator adds ciphertexts and never holds a model in the clear.

The federation test runs a 3-site run under ``secure_aggregation = "ckks"`` on a real coordinator
(SuperLink, warm executor, nginx gateway, TLS, node auth), searches everything on the coordinator's
disk (run folders, the SuperLink's database, logs) for the run's model and for the sites' secret key,
then runs the same settings with plain FedAvg and compares every round's model: the coordinator's
encrypted checkpoints, decrypted at a site, match plain FedAvg's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flowerbed import audit, ckks
from flowerbed.clientapp import ckks as site_ckks
from flowerbed.config import RunSettings, load_federation
from flowerbed.demodata import make_demo_data
from flowerbed.errors import FlowerbedError
from flowerbed.runfolder import CKKS_KEYRING, FINAL_MODEL, SERVERAPP_FILE, checkpoint_path, read_rows, run_id_of
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for
from tests.procs import alive, descendants, memory_holds


def test_the_coordinators_sum_decrypts_to_the_weighted_mean_and_its_context_cannot_decrypt() -> None:
    context = ckks.new_context()
    public = ckks.public_bytes(context)
    kid = ckks.key_id(context)
    again = ckks.new_context()
    assert ckks.public_bytes(again) == public and ckks.key_id(again) != kid  # one id per key, not per parameters
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=(64, 30)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32),
               "n": np.array(7, dtype=np.int64)} for _ in range(3)]  # fmt: skip
    encrypted = [ckks.encrypt(context, s, kid) for s in states]
    manifest = encrypted[0][0]
    assert manifest.chunks == -(-(64 * 30 + 64 + 1) // ckks.SLOTS) and all(e[0] == manifest for e in encrypted)
    weights = [0.5, 0.3, 0.2]
    at_coordinator = ckks.load_context(public)
    assert not at_coordinator.is_private() and len(public) < 1000  # parameters only: no key of any kind
    summed = ckks.weighted_sum(at_coordinator, [(w, e[1]) for w, e in zip(weights, encrypted, strict=True)])
    with pytest.raises(ValueError, match="secret"):
        ckks.decrypt(at_coordinator, manifest, summed)
    plain = ckks.decrypt(context, manifest, summed)
    for name in ("w", "b"):
        expected = sum(w * s[name].astype(np.float64) for w, s in zip(weights, states, strict=True))
        assert plain[name].dtype == np.float32 and np.abs(plain[name] - expected).max() < 1e-5
    assert plain["n"] == 7 and plain["n"].dtype == np.int64
    # The record round-trips through a torch checkpoint (what the coordinator writes to disk).
    record = ckks.to_record(manifest, summed)
    back = ckks.from_record(type(record)(record.to_torch_state_dict()))
    assert back == (manifest, summed)


def test_a_wrapped_key_opens_only_for_its_recipient_and_a_changed_peer_key_is_refused(tmp_path: Path) -> None:
    maker = ckks.ExchangeKey.load_or_create(tmp_path / "a" / "exchange.key")
    recipient = ckks.ExchangeKey.load_or_create(tmp_path / "b" / "exchange.key")
    other = ckks.ExchangeKey.load_or_create(tmp_path / "c" / "exchange.key")
    assert (tmp_path / "a" / "exchange.key").stat().st_mode & 0o777 == 0o600
    assert ckks.ExchangeKey.load_or_create(tmp_path / "a" / "exchange.key").public == maker.public  # kept
    secret = ckks.secret_bytes(ckks.new_context())
    blob = ckks.wrap(secret, maker, recipient.public, kid="k1", sender="inst-a", recipient="inst-b")
    assert secret[:64] not in blob and len(blob) == len(secret) + 12 + 16
    assert ckks.unwrap(blob, recipient, maker.public, kid="k1", sender="inst-a", recipient="inst-b") == secret
    for own, kid, to in ((other, "k1", "inst-b"), (recipient, "k2", "inst-b"), (recipient, "k1", "inst-c")):
        with pytest.raises(FlowerbedError, match="does not open with this site's exchange key"):
            ckks.unwrap(blob, own, maker.public, kid=kid, sender="inst-a", recipient=to)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(FlowerbedError, match="changed on the way"):
        ckks.unwrap(flipped, recipient, maker.public, kid="k1", sender="inst-a", recipient="inst-b")
    # Trust on first use, then pinned: the coordinator cannot swap a peer's exchange key later.
    folder = tmp_path / "b"
    site_ckks.pin(folder, "inst-a", maker.public)
    site_ckks.pin(folder, "inst-a", maker.public)
    with pytest.raises(FlowerbedError, match="site inst-a's exchange key changed: pinned"):
        site_ckks.pin(folder, "inst-a", other.public)
    assert (folder / site_ckks.PEERS_FILE).stat().st_mode & 0o777 == 0o600


def _coordinator_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _windows(values: np.ndarray, count: int = 4, width: int = 16) -> list[bytes]:
    """``count`` runs of ``width`` consecutive float32 values, as they would lie in a file or a message."""
    flat = values.astype(np.float32).ravel()
    step = max((flat.size - width) // count, 1)
    return [flat[i : i + width].tobytes() for i in range(0, step * count, step)]


@pytest.mark.federation
def test_ckks_matches_fedavg_and_the_coordinator_never_holds_a_model_or_a_key(
    running: RunningFederation, tmp_path: Path
) -> None:
    base = running.config.run.model_dump() | {"min_nodes": 3, "max_rounds": 3, "patience": 20, "node_wait_s": 120,
                                              "keep_checkpoints": 3, "standardize_features": False,
                                              "local_epochs": 25}  # fmt: skip
    with supervised_sites(running.layout, running.gateway, dict(running.data.site_files), tmp_path / "work") as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
        received = tmp_path / "received"
        secure = submit(running.layout, RunSettings.model_validate(base | {"secure_aggregation": "ckks",
                                                                           "secagg_inspect": str(received)}),
                        name="ckks-secure")  # fmt: skip
        # Mid-run, the coordinator's processes (SuperLink, gateway, executor and the run's ServerApp) hold
        # no part of the sites' secret key in memory; the test process, which loads it, does (the control).
        assert wait_for(lambda: len([r for r in read_rows(secure.out_dir) if r["kind"] == "train"]) >= 1, 180)
        pids = [d for p in running.stack.processes if p.popen is not None for d in descendants(p.pid)]
        serverapp = json.loads((secure.out_dir / SERVERAPP_FILE).read_text())["pid"]
        kid = json.loads((secure.out_dir / CKKS_KEYRING).read_text())["key_id"]
        key_file = sups["inst-a"].spec.he_dir / "keys" / f"{kid}.ckks"
        held_here = ckks.load_context(key_file.read_bytes())  # kept alive: the key's memory is the context's
        secret_key = held_here.secret_key().data.data()
        runs = [[secret_key.data(i) for i in range(j, j + 8)] for j in range(0, secret_key.coeff_count() - 8, 997)]
        needles = [struct.pack("<8Q", *run) for run in runs if len(set(run)) == 8 and min(run) > 0][:6]
        assert len(needles) == 6
        assert memory_holds(os.getpid(), needles) == needles  # the search finds the key where it is
        assert serverapp in pids and all(alive(pid) for pid in pids[:1])
        held = {pid: memory_holds(pid, needles) for pid in pids}
        assert not any(held.values()), {pid: len(n) for pid, n in held.items() if n}
        result = follow(running.layout, secure, timeout_s=300)
        check_result(result, secure)
        trained = [r for r in result.rows if r["kind"] == "train"]
        assert [(r["round"], sorted(r["sites"]), r["errors"]) for r in trained] == [
            (i, sorted(SITES), []) for i in (1, 2, 3)
        ]
        assert all(r["train_loss"] is not None and r["eval_loss"] is not None for r in trained)  # metrics in the clear
        # Every reply the ServerApp received carried ciphertext only: the manifest and CKKS vectors, bytes.
        lines = [json.loads(line) for line in (received / "received.jsonl").read_text().splitlines()]
        assert sorted((line["round"], line["site"]) for line in lines) == [
            (r, s) for r in (1, 2, 3) for s in sorted(SITES)
        ]
        for line in lines:
            assert line["arrays"] and all(name.startswith("arrays/ckks/") and dtype == "uint8"
                                          for name, (dtype, _, _) in line["arrays"].items()), line  # fmt: skip

        # The keys: made at the first site, wrapped for the others, the coordinator holds public parts only.
        keyring = json.loads((secure.out_dir / CKKS_KEYRING).read_text())
        assert keyring["key_id"] == kid
        assert keyring["maker"] == "inst-a" and sorted(keyring["wrapped"]) == sorted(SITES[1:])
        assert sorted(keyring["holders"]) == sorted(SITES)
        assert not ckks.load_context(base64.b64decode(keyring["public_context"])).is_private()
        secrets = {site: (sup.spec.he_dir / "keys" / f"{kid}.ckks").read_bytes() for site, sup in sups.items()}
        assert len(set(secrets.values())) == 1  # every site holds the same key, unwrapped
        for site, sup in sups.items():
            log = " ".join(sup.log_path.read_text().split())
            assert f"sent its model encrypted with CKKS key {kid}" in log, site
            if site != "inst-a":
                assert f"received CKKS key {kid} from site inst-a" in log, site

        # The model of every round exists in the clear only at the sites: decrypted there, and nowhere on
        # the coordinator's disk (run folders, the SuperLink's database, logs); nor is any part of the key.
        he = sups["inst-b"].spec.he_dir
        models = {}
        for server_round in (1, 2, 3):
            plain_path = tmp_path / f"round-{server_round}.pt"
            manifest = site_ckks.decrypt_file(checkpoint_path(secure.out_dir, server_round), he, plain_path)
            assert manifest.key_id == kid
            models[server_round] = torch.load(plain_path, weights_only=True)
        final = tmp_path / "final.pt"
        site_ckks.decrypt_file(secure.out_dir / FINAL_MODEL, he, final)
        needles = [w for state in models.values() for t in state.values() if t.numel() >= 64
                   for w in _windows(t.numpy())]  # fmt: skip
        secret = secrets["inst-a"]
        needles += [secret[i : i + 64] for i in range(1000, len(secret) - 64, len(secret) // 8)]
        found = []
        for path in _coordinator_files(running.layout.root):
            data = path.read_bytes()
            found += [str(path) for needle in needles if needle in data]
        assert not found, sorted(set(found))
        assert final.stat().st_mode & 0o777 == 0o600

        plain = submit(running.layout, RunSettings.model_validate(base), name="ckks-plain")
        check_result(follow(running.layout, plain, timeout_s=300), plain)

    # The same model as plain FedAvg, round by round (CKKS's error is ~1e-7 per round).
    for server_round in (1, 2, 3):
        expected = torch.load(checkpoint_path(plain.out_dir, server_round), weights_only=True)
        got = models[server_round]
        assert expected.keys() == got.keys()
        gap = max(float((expected[k].double() - got[k].double()).abs().max()) for k in expected)
        assert gap < 1e-4, (server_round, gap)
    # The trails: the coordinator recorded the key's making and wrapping with fingerprints, never key bytes.
    events = [e["details"] for e in audit.read(running.layout.audit) if e["details"].get("run") == secure.out_dir.name]
    made = [e for e in events if e.get("event") == "ckks key made"]
    wrapped = [e for e in events if e.get("event") == "ckks key wrapped"]
    assert [e["key_id"] for e in made] == [kid] and sorted(e["recipient"] for e in wrapped) == sorted(SITES[1:])
    assert all(":" in e["recipient_key"] for e in wrapped)


ROUNDS = 20  # enough that the run is still going when its coordinator is killed (flat messages: ~3 s a round)


@pytest.mark.federation
def test_a_ckks_run_takes_a_new_site_drops_a_revoked_one_and_survives_a_killed_coordinator(tmp_path: Path) -> None:
    """Two sites start a CKKS run; a third joins after round 1 and gets the key wrapped by a site that holds
    it; once it has trained, its VM dies mid-run (the round goes on with the other two), and it is revoked
    (its wrapped key withdrawn); then the whole coordinator is killed (SIGKILL) and started again: the run
    resumes from its encrypted checkpoint with the sites' keys, every round once, and its final model is
    ciphertext a site decrypts."""
    from tests.conftest import make_config, make_federation, run_cli
    from tests.test_resume import Coordinator, trained

    config = make_config("ckks-resume", SITES, min_nodes=2)
    layout = make_federation(tmp_path / "fed", config)
    coordinator = Coordinator(layout, tmp_path / "coordinator.out").start()
    data = make_demo_data(tmp_path / "data", SITES)
    gateway, late = f"localhost:{config.superlink.port}", SITES[2]
    rows = lambda: [r for r in read_rows(handle.out_dir) if r["kind"] == "train"]  # noqa: E731
    try:
        assert wait_for(lambda: "is up" in coordinator.text(), 120), coordinator.text()
        with contextlib.ExitStack() as stack:
            sups = stack.enter_context(supervised_sites(layout, gateway, {s: data.site_files[s] for s in SITES[:2]},
                                                        tmp_path / "work", max_backoff_s=5))  # fmt: skip
            assert wait_for(lambda: all(s.connected for s in sups.values()), 120)
            settings = RunSettings.model_validate(
                load_federation(layout.root).run.model_dump()
                | {"secure_aggregation": "ckks", "max_rounds": ROUNDS, "patience": 30, "round_timeout_s": 20,
                   "node_wait_s": 180, "local_epochs": 30, "standardize_features": False}
            )  # fmt: skip
            handle = submit(layout, settings, name="sealed")
            assert wait_for(lambda: len(rows()) >= 1, 180), coordinator.text()
            joined = stack.enter_context(supervised_sites(layout, gateway, {late: data.site_files[late]},
                                                          tmp_path / "work", max_backoff_s=5))[late]  # fmt: skip
            assert wait_for(lambda: any(late in r["sites"] for r in rows()), 180), coordinator.text()
            keyring = json.loads((handle.out_dir / CKKS_KEYRING).read_text())
            kid = keyring["key_id"]
            log = " ".join(joined.log_path.read_text().split())
            assert f"received CKKS key {kid} from site inst-" in log, log[-2000:]
            assert late in keyring["wrapped"] and sorted(keyring["holders"]) == sorted(SITES)

            # Its VM dies mid-run (SuperNode and executor, SIGKILL): the round it was sent goes on with the others.
            before = len(rows())
            for proc in (joined.process, joined.executor):
                if proc is not None and proc.popen is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            assert wait_for(lambda: any(late not in r["sites"] and late in " ".join(r["errors"]) and len(r["sites"]) == 2
                                        for r in rows()[before:]), 180), rows()[before:]  # fmt: skip

            revoked = run_cli("certs", "revoke", late, "-d", str(layout.root))
            assert revoked.returncode == 0, revoked.stderr
            assert wait_for(lambda: late not in rows()[-1]["sites"] and late not in json.loads(
                (handle.out_dir / CKKS_KEYRING).read_text())["wrapped"], 180), coordinator.text()  # fmt: skip

            second_id = run_id_of(handle.out_dir)
            assert len(rows()) < ROUNDS, "the run ended before the coordinator could be killed: raise ROUNDS"
            coordinator.kill_all()
            coordinator.start()
            assert wait_for(lambda: run_id_of(handle.out_dir) != second_id, 150), coordinator.text()
            result = follow(layout, handle, timeout_s=400)
            check_result(result, handle)
            assert trained(handle.out_dir) == list(range(1, ROUNDS + 1))  # every round once
            assert [r["kind"] for r in result.rows].count("resumed") == 1
            # At the coordinator only ciphertext; at a site that took part, the plain model.
            sealed = ckks.manifest_of_file(handle.out_dir / FINAL_MODEL)
            assert sealed is not None and sealed.key_id == kid
            plain = tmp_path / "final.pt"
            site_ckks.decrypt_file(handle.out_dir / FINAL_MODEL, sups["inst-b"].spec.he_dir, plain)
            assert set(torch.load(plain, weights_only=True)) == set(sealed.names)
            with pytest.raises(FlowerbedError, match="holds no CKKS key"):
                site_ckks.decrypt_file(handle.out_dir / FINAL_MODEL, tmp_path / "elsewhere", tmp_path / "x.pt")
        events = [e["details"] for e in audit.read(layout.audit) if e["details"].get("run") == "sealed"]
        assert [e["recipient"] for e in events if e.get("event") == "ckks key wrapped"] == ["inst-b", late]
        assert [e["site"] for e in events if e.get("event") == "ckks key withdrawn"] == [late]
    finally:
        coordinator.stop()
