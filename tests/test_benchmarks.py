"""Every benchmark runs at its smoke size, as a user reruns it: a table printed, JSON + PNG written.

Real federations (kit, plain Flower, the simulation engine), real files. Nothing here asserts on a
timing: the figures are this machine's, and live in docs/benchmarks/ (see docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "round_time": ("Seconds per steady round", ["kit (warm executor, default)", "plain Flower 1.42", "compute floor"]),
    "time_to_federation": ("Time to federation", ["superlink start", "sites start", "kit steps in all"]),
    "transfer": ("Model transfer", ["raw TLS"]),
    "scaling": ("Scaling on this machine", ["Linear fits"]),
    "kit_ops": ("Certificates and kits", ["kit build"]),
    "privacy": ("Pooled digits, MLP", ["no DP", "epsilon 1", "dp-accounting RDP"]),
    "standardize": ("Raw breast-cancer features", ["standardize_features = false", "standardize_features = true"]),
    "secure_modes": ("Aggregation modes", ["plain FedAvg", "CKKS"]),
    "compression": ("Compression on the demo", ["none", "fp16", "int8", "fewer bytes"]),
    "requests": ("Gateway requests per site per steady round", ["flat (default)", "Flower's object trees",
                                                                  "pull-object", "object trees / flat"]),
    "memory": ("Coordinator peak PSS", ["running sum (fedavg)", "every update held (fedmedian)"]),
    "wan": ("Rounds over a 100 Mbit/s", ["int8", "kit / floor"]),
}  # fmt: skip


@pytest.mark.federation
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_at_smoke_size(name: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=880, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    title, needles = BENCHMARKS[name]
    assert title in result.stdout
    for needle in needles:
        assert needle in result.stdout, needle
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["smoke"] is True
    assert data["machine"]["versions"]["flwr"].startswith("1.42")
    assert data["command"].startswith(f"python -m benchmarks.{name}")
    assert data.get("rows") or data.get("phases_s")
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "transfer":  # plain Flower ran with the kit's certificates (TLS) and its state in a file
        assert all(r["plain_tls_round_s"] > 0 for r in data["rows"]), data["rows"]
    if name == "requests":  # counts, not timings: a flat message is 3 objects each way, Flower's tree 13
        flat = next(r for r in data["rows"] if r["mode"] == "flat (default)")["requests_per_site"]
        trees = next(r for r in data["rows"] if r["mode"] != "flat (default)")["requests_per_site"]
        assert flat["push-object"] <= 3.5 and trees["push-object"] >= 12, (flat, trees)
        assert flat["pull-object"] < trees["pull-object"] / 3, (flat, trees)
