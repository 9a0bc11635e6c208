"""A 60 MB model for two rounds through the real nginx gateway: it trains, and the kit keeps what it should.

Each exchange moves the whole model to and from each site in Flower's 5 MiB chunks through the
gateway (client_max_body_size is what makes this pass). Checkpoints keep the last one and the
best; the final model is a trained one, never the initial.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from flowerbed.config import RunSettings
from flowerbed.demodata import make_demo_data
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, coordinator, make_config, make_federation, supervised_sites
from tests.faults import record

HIDDEN = 470_000  # 30 features -> 470k hidden -> 2 classes: 15.5M float32 parameters, 62 MB


@pytest.mark.federation
def test_a_60_mb_model_trains_two_rounds_through_the_gateway(tmp_path: Path) -> None:
    config = make_config("big", SITES[:2], min_nodes=2)
    layout = make_federation(tmp_path / "fed", config)
    data = make_demo_data(tmp_path / "data", SITES)
    gateway = f"localhost:{config.superlink.port}"
    with coordinator(layout, config):
        with supervised_sites(layout, gateway, {s: data.site_files[s] for s in SITES[:2]}, tmp_path):
            settings = RunSettings.model_validate(
                config.run.model_dump()
                | {"hidden_units": HIDDEN, "max_rounds": 2, "patience": 10, "round_timeout_s": 600,
                   "keep_checkpoints": 1}
            )  # fmt: skip
            started = time.monotonic()
            handle = submit(layout, settings, name="big")
            result = follow(layout, handle, timeout_s=1200)
    check_result(result, handle)
    rows = [r for r in result.rows if r["kind"] == "train"]
    assert [(r["round"], r["nodes"]) for r in rows] == [(1, 2), (2, 2)], result.rows
    final = handle.out_dir / "final_model.pt"
    size_mb = final.stat().st_size / 1e6
    assert size_mb > 60, size_mb
    checkpoints = sorted(p.name for p in (handle.out_dir / "checkpoints").glob("*.pt"))
    assert checkpoints == ["best.pt", "round-0002.pt"], checkpoints  # the last one and the best, no more
    best = torch.load(handle.out_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["round"] >= 2  # a trained model: round 1 evaluates the initial one
    access = (layout.logs / "gateway-access.log").read_text()
    assert '" 413 ' not in access and '" 500 ' not in access
    moved_mb = size_mb * 2 * 2 * 2  # model down and up, per site, per round
    record("a 60 MB model for 2 rounds through the gateway", "a completed run; final model and best.pt trained",
           injected=f"MLP with {HIDDEN} hidden units ({size_mb:.0f} MB)", noticed_s=None, recovered_s=None,
           rounds_lost=0, replies_lost=0, round_s="/".join(f"{r['seconds']:.0f}" for r in rows),
           mb_per_s=round(moved_mb / sum(r["seconds"] for r in rows), 1),
           total_s=round(time.monotonic() - started))  # fmt: skip
