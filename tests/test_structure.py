"""The code's shape, kept: every public definition of a library module says what it returns.

(The CLI's commands are documented by their ``help=``; Flower's internals and the layers of the
imports are checked in tests/test_flower_hooks.py.)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ["certs", "superlink", "supernode", "serverapp", "clientapp", "deploy", "flowerbed"]


def _undocumented(path: Path) -> list[str]:
    missing: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not child.name.startswith(
                "_"
            ):
                if ast.get_docstring(child) is None:
                    missing.append(f"{path.relative_to(ROOT)}:{child.lineno} {prefix}{child.name}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text("utf-8")), "")
    return missing


def test_every_public_definition_of_a_library_module_has_a_docstring() -> None:
    missing = [
        line
        for folder in LIBRARY
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "commands" not in path.relative_to(ROOT).parts
        for line in _undocumented(path)
    ]
    assert missing == [], "public definitions without a docstring:\n" + "\n".join(missing)


SAMPLE_CONFTEST = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith("test_heavy.py"):
            item.add_marker(pytest.mark.xdist_group("shared"))
"""


def test_concurrent_workers_keep_a_group_on_one_worker(tmp_path: Path) -> None:
    """The suite's concurrency relies on it: a module's tests that share a coordinator run on one worker."""
    (tmp_path / "conftest.py").write_text(SAMPLE_CONFTEST)
    (tmp_path / "test_heavy.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(4)))
    (tmp_path / "test_light.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(4)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadgroup",
                           "-v", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {
        line.split("]")[0] for line in done.stdout.splitlines() if "test_heavy.py::" in line and "PASSED" in line
    }
    assert len(workers) == 1 and all("@shared" in line for line in done.stdout.splitlines()
                                     if "test_heavy.py::" in line and "PASSED" in line), done.stdout  # fmt: skip


def test_the_solo_tests_name_test_files_that_exist() -> None:
    """A renamed CPU-bound test file would silently leave the solo phase and run beside the others."""
    from tests.conftest import SOLO

    assert [p for p in SOLO if not (ROOT / p).is_file()] == []
