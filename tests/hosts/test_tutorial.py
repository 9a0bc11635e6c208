"""docs/tutorial-own-task.md, executed: its bash blocks in order, exactly as written, on three hosts.

A coordinator and two hospitals, each a network namespace with its own HOME. The researcher's
task goes from `flowerbed task new` to a converged run on the hospitals' own image folders; one
hospital refuses it until its data steward approves, and no code of the task runs there before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hosts.docscript import Block, blocks
from tests.hosts.netns import Host, network
from tests.hosts.test_deployment import GATEWAY, _requirements

TUTORIAL = Path(__file__).parent.parent.parent / "docs" / "tutorial-own-task.md"
SITE_SECTIONS = {"5.": "hospital-a", "6.": "hospital-b", "8.": "hospital-b"}


def hospital_images(home: Path, part: int) -> None:
    """The hospital's own image folders: its half of scikit-learn's digits, benign (0-4) or malignant (5-9)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    pixels = np.round(x.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
    for n in range(part, len(y), 2):
        folder = home / "images" / ("malignant" if y[n] >= 5 else "benign")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[n]).save(folder / f"{n:04d}.png")


def host_of(block: Block) -> str:
    return next((site for prefix, site in SITE_SECTIONS.items() if block.section.startswith(prefix)), "coordinator")


@pytest.mark.federation
def test_the_own_task_tutorial_runs_as_written(tmp_path: Path) -> None:
    _requirements()
    script = [b for b in blocks(TUTORIAL) if not b.skip]
    assert [b.section[:2] for b in script if b.background] == ["4.", "5.", "6."]
    with network(tmp_path / "hosts", subnet_index=2) as net:
        hosts: dict[str, Host] = {name: net.add(name) for name in ("coordinator", "hospital-a", "hospital-b")}
        net.name(GATEWAY, hosts["coordinator"])
        for part, site in enumerate(("hospital-a", "hospital-b")):
            hospital_images(hosts[site].home, part)
        cwd = {name: host.home for name, host in hosts.items()}
        outputs: dict[str, str] = {}
        for block in script:
            name = host_of(block)
            host = hosts[name]
            if block.section.startswith("5.") and not (host.home / "hospital-a.tar.gz").exists():
                for site in ("hospital-a", "hospital-b"):  # the coordinator sends each its archive
                    shutil.copy(hosts["coordinator"].home / "study" / "kits" / f"{site}.tar.gz", hosts[site].home)
            if block.background:
                proc = host.start(f"bg-{block.section[:2]}", block.command, cwd=cwd[name])
                ready = "is up: gateway 0.0.0.0:9092" if name == "coordinator" else f"connected to {GATEWAY}:9092"
                assert proc.saw(ready, 180), f"{name}:\n{proc.text()}"
                continue
            marker = host.home / ".cwd"
            result = host.run(f"{block.command}\npwd > {marker}", cwd=cwd[name], timeout=900)
            text = " ".join((result.stdout + result.stderr).split())
            assert result.returncode == 0, f"{name}: `{block.command[:300]}` failed:\n{text[-3000:]}"
            assert "Traceback" not in text, text[-3000:]
            cwd[name] = Path(marker.read_text().strip())
            outputs[block.section[:3]] = outputs.get(block.section[:3], "") + text

        coordinator, site_b = hosts["coordinator"], hosts["hospital-b"]
        # 3: check passed on the example images; build printed the wheel's sha256.
        assert "task check passed" in outputs["3. "] and "auroc" in outputs["3. "]
        digest = next(w for w in outputs["3. "].split() if len(w) == 64 and all(c in "0123456789abcdef" for c in w))
        # 5: the steward saw name, version, hash and dependencies before approving.
        assert f"lesion-check 0.1.0 (sha256 {digest})" in outputs["5. "]
        # 7: the first run trained at A and showed B's refusal with the hash and the command.
        refusal = f"site hospital-b refused task lesion-check (sha256 {digest}): not approved here"
        command = "`flowerbed supernode approve tasks/flowerbed_task_lesion_check-0.1.0-py3-none-any.whl` in the kit"
        assert refusal in outputs["7. "] and command in outputs["7. "], outputs["7. "]
        first = [json.loads(line) for line in (coordinator.home / "study/runs/first-try/history.jsonl").open()]
        assert [r["sites"] for r in first if r["kind"] == "train"] == [["hospital-a"]]
        assert "REFUSED" in (site_b.home / "bg-6..out").read_text()
        # 9: both trained every round, and the run ended on its own criteria.
        study = coordinator.home / "study/runs/study"
        rows = [json.loads(line) for line in (study / "history.jsonl").open()]
        trained = [r for r in rows if r["kind"] == "train"]
        assert trained and all(sorted(r["sites"]) == ["hospital-a", "hospital-b"] for r in trained)
        summary = json.loads((study / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["stop_reason"] in (
            "target-reached",
            "max-rounds",
            "plateau",
        )
        assert max(r["metrics"]["eval-auroc"] for r in trained) > 0.9
        # 10: the results as the tutorial reads them, and the model loaded with its task.
        assert "study" in outputs["10."] and "loaded lesion-check" in outputs["10."]
