"""The code's shape, kept: every public definition of a library module says what it returns.

(The CLI's commands are documented by their ``help=``; Flower's internals and the layers of the
imports are checked in tests/test_flower_hooks.py.)
"""

from __future__ import annotations

import ast
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
