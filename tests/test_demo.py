"""End to end: `flowerbed demo` reaches a convergence criterion and the federated model is useful."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from flowerbed.probes import tcp_open
from flowerbed.serverapp.criteria import MAX_ROUNDS, PLATEAU, TARGET, TIME_BUDGET
from tests.conftest import run_cli


def test_demo_end_to_end(tmp_path: Path) -> None:
    result = run_cli("demo", "--work-dir", str(tmp_path), timeout=420)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    flat = " ".join(text.split())
    match = re.search(r"stopped: (\S+) in (\d+) s", flat)
    assert match, flat
    assert match.group(1) in (TARGET, PLATEAU, MAX_ROUNDS, TIME_BUDGET)
    assert int(match.group(2)) < 300  # the bound for this 2-core machine

    accuracy: dict[str, float] = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 4 and re.fullmatch(r"\d\.\d{4}", cells[2]):
            accuracy[cells[0]] = float(cells[2])
    local = {k: v for k, v in accuracy.items() if k.startswith("local only")}
    assert len(local) == 3, accuracy
    assert accuracy["federated (flowerbed)"] > min(local.values())
    assert "centralized (pooled data)" in accuracy

    out = tmp_path / "federation" / "runs" / "demo"
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "final_model.pt").is_file()
    # every process was stopped: the gateway's port is closed again
    config = tomllib.loads((tmp_path / "federation" / "federation.toml").read_text())
    assert not tcp_open("127.0.0.1", config["superlink"]["port"])
    assert not tcp_open("127.0.0.1", config["superlink"]["internal_port"])
