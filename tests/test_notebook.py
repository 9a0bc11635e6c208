"""The notebook API as a researcher uses it: docs/notebook.ipynb executed headless (nbclient, a real
Jupyter kernel) against a real loopback federation (SuperLink, gateway, two supervised SuperNodes)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import SITES, RunningFederation, supervised_sites, wait_for

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebook.ipynb"


def text_of(cell: dict[str, object]) -> str:
    out = []
    for output in cell.get("outputs", []):  # type: ignore[attr-defined]
        out.append(str(output.get("text", "")))
        out.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.federation
def test_the_example_notebook_runs_a_federation(running: RunningFederation, tmp_path: Path) -> None:
    data = {s: running.data.site_files[s] for s in SITES[:2]}
    with supervised_sites(running.layout, running.gateway, data, tmp_path / "sites") as sups:
        assert wait_for(lambda: all(s.connected for s in sups.values()), 90)
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        saved = {k: os.environ.get(k) for k in ("FLOWERBED_DIR", "ROUNDS")}
        os.environ.update(FLOWERBED_DIR=str(running.layout.root), ROUNDS="3")  # the kernel inherits them
        try:
            NotebookClient(notebook, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert "inst-a" in text_of(cells[0])
    name = text_of(cells[1]).strip().strip("'")
    assert name.startswith("nb-")
    watched = text_of(cells[2])
    assert "round 1, train, 2 site(s), eval loss" in watched and "('completed', 'max-rounds')" in watched
    table = text_of(cells[3])
    assert "eval_accuracy" in table and "final-eval" in table
    assert int(text_of(cells[4]).strip()) > 0  # the final model's parameters
    assert name in text_of(cells[5])
    assert (running.layout.runs / name / "final_model.pt").exists()
