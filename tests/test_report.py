"""The evidence report of a real run (local-only baselines at two sites, through the gateway), opened in
a real headless browser (Debian's Chromium): its DOM holds every section and the screenshot is not blank."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from flowerbed.config import RunSettings
from flowerbed.report import comparison_rows
from flowerbed.runner import check_result, follow, submit
from tests.conftest import SITES, RunningFederation, run_cli, supervised_sites, wait_for


def browser() -> str:
    found = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if found is None:
        pytest.fail("no Chromium: scripts/setup.sh --dev installs chromium-headless-shell")
    return found


def headless(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [browser(), "--no-sandbox", "--disable-gpu", "--headless", "--allow-file-access-from-files", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


@pytest.mark.federation
def test_the_report_of_a_run_opens_in_a_browser(running: RunningFederation, tmp_path: Path) -> None:
    data = {s: running.data.site_files[s] for s in SITES[:2]}
    with supervised_sites(running.layout, running.gateway, data, tmp_path / "sites") as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 90)
        settings = RunSettings.model_validate(
            running.config.run.model_dump() | {"min_nodes": 2, "max_rounds": 3, "patience": 20, "local_baseline": True}
        )
        handle = submit(running.layout, settings, name="evidence")
        result = follow(running.layout, handle, timeout_s=400)
        check_result(result, handle)
    final = result.rows[-1]
    assert final["kind"] == "final-eval" and set(final["per_site"]) == set(SITES[:2])
    assert all("local-accuracy" in m and "eval-accuracy" in m for m in final["per_site"].values())
    written = run_cli("report", "evidence", "-d", str(running.layout.root))
    assert written.returncode == 0, written.stderr
    report = handle.out_dir / "report.html"
    assert f"wrote {report}" in " ".join(written.stdout.split())
    dom = headless("--dump-dom", report.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for needle in ("Federated run", 'id="convergence"', 'id="participation"', 'id="no-dp"',
                   'id="comparison"', "local only: inst-a", "federated, on inst-b", 'id="audit-state"',
                   "the chain is intact", "data:image/png;base64,"):  # fmt: skip
        assert needle in page, needle
    assert page.count("<tr>") > 10 and "inst-a" in page and "inst-b" in page
    # Each site's class balance, from the class counts its replies carried (the built-in task's CSV).
    counts = next(r["classes"] for r in reversed(result.rows) if r["kind"] == "train")
    for site in SITES[:2]:
        total = sum(counts[site].values())
        shown = ", ".join(f"{k}: {v} ({100 * v / total:.0f}%)" for k, v in sorted(counts[site].items()))
        assert shown in page, (site, shown)
    # Judged from the verification, not its wording: "unchanged" holds "changed".
    assert '<p id="audit-state" class="ok">' in page and "anchored gateway logs unchanged" in page
    copy = tmp_path / "copy"  # the same run with its coordinator trail altered: the line turns red
    shutil.copytree(handle.out_dir, copy / "runs" / "evidence")
    shutil.copyfile(running.layout.config, copy / "federation.toml")
    lines = running.layout.audit.read_text().splitlines()
    lines[1] = lines[1].replace('"coordinator"', '"someone else"', 1)
    (copy / "audit.jsonl").write_text("\n".join(lines) + "\n")
    assert run_cli("report", "evidence", "-d", str(copy)).returncode == 0
    altered = headless("--dump-dom", (copy / "runs" / "evidence" / "report.html").as_uri(), cwd=tmp_path).stdout
    assert '<p id="audit-state" class="bad">' in altered and "line 2:" in altered
    shot = tmp_path / "report.png"
    taken = headless(f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri(), cwd=tmp_path)
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    for needle in ('id="model-card"', "parameters", 'id="sites"', " of 3", 'id="settings"', 'id="no-test"',
                   'id="metrics"'):  # fmt: skip  # what an ethics board reads
        assert needle in page, needle

    # A long run's wide tables (participation over 24 rounds) wrap to the page when printed: the same run's
    # files with its rounds repeated, printed to PDF by Chromium, each page drawn by pdftoppm.
    long = tmp_path / "long"
    shutil.copytree(copy, long)
    history = long / "runs" / "evidence" / "history.jsonl"
    trained = [json.loads(line) for line in history.read_text().splitlines() if '"kind": "train"' in line]
    history.write_text("".join(json.dumps(trained[i % len(trained)] | {"round": i + 1}) + "\n" for i in range(24)))
    assert run_cli("report", "evidence", "-d", str(long)).returncode == 0
    pdf = tmp_path / "report.pdf"
    printed = headless(f"--print-to-pdf={pdf}", "--no-pdf-header-footer",
                       (long / "runs" / "evidence" / "report.html").as_uri(), cwd=tmp_path)  # fmt: skip
    assert printed.returncode == 0 and pdf.read_bytes()[:5] == b"%PDF-", printed.stderr[-2000:]
    drawn = subprocess.run(["pdftoppm", "-png", "-r", "50", str(pdf), str(tmp_path / "page")], capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) >= 2
    for path in pages:  # nothing runs off the page: the right-hand edge of every page stays blank
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            edge = [rgb.getpixel((x, y)) for x in range(rgb.width - 4, rgb.width) for y in range(rgb.height)]
        assert all(min(pixel) > 235 for pixel in edge), path.name


def test_every_missing_comparison_cell_says_why(tmp_path: Path) -> None:
    """An own task's run driven by AUROC, without local baselines: the table is not a row of dashes."""
    summary = {"target_metric": "auroc", "best_model": "round 4", "best_metrics": {"auroc": 0.91, "loss": 0.3}}
    final = {"kind": "final-eval", "per_site": {"inst-a": {"eval-auroc": 0.9, "eval-loss": 0.31, "examples": 40}}}
    basis, metric, rows = comparison_rows(tmp_path, [final], summary)
    assert metric == "auroc" and "validation split" in basis
    assert rows[0][2:] == [0.91, 0.3] and "round 4" in rows[0][0]
    assert rows[1][0] == "local only (each site)" and "--local-baseline" in rows[1][2]
    assert rows[-1][0] == "centralized" and "pooled in one place" in rows[-1][2]
    # With local baselines from a task that reports no AUROC locally: that cell names the metric missing.
    final["per_site"]["inst-a"] |= {"local-loss": 0.4}
    _, _, rows = comparison_rows(tmp_path, [final], summary)
    assert rows[1][0] == "local only: inst-a" and rows[1][2] == "- (the task reports no auroc)" and rows[1][3] == 0.4
    assert rows[2][2:] == [0.9, 0.31]
