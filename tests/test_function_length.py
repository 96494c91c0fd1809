"""Routines short enough to read at once: no function in ``unetseg/`` or ``apps/`` runs over
:data:`MAX_LINES` lines (decorators and docstring included) unless its docstring says why, with a line that
starts "Long because:"."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60
REASON = "Long because:"


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``"path:line name (N lines)"`` of each function under ``root`` longer than ``max_lines`` without a reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > max_lines and REASON not in (ast.get_docstring(node) or ""):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_or_the_apps_is_too_long():
    assert long_functions(REPO / "unetseg") + long_functions(REPO / "apps") == []


def test_the_scan_finds_a_long_function_and_accepts_a_stated_reason(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (package / "a.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    (package / "b.py").write_text(f'class C:\n    def explained(self):\n        """{REASON} one table."""\n'
                                  + body.replace("    ", "        ") + "\n")
    assert long_functions(package) == [f"pkg/a.py:1 long ({MAX_LINES + 1} lines)"]
