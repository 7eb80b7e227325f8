"""The house rules on size, kept by a check over the source: no function over 80 lines, no file over 500.

A function's length runs from its `def` line to its last line (docstring and comments included, decorators
not); nested functions count inside their parent and on their own."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def too_long(root: Path = SRC) -> list[str]:
    """'path:line name (n lines)' for each function over the limit, 'path (n lines)' for each file over it."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{where} ({lines} lines)")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_long_function_or_file():
    assert SRC.is_dir() and len(list(SRC.rglob("*.py"))) > 50
    assert too_long() == []


def test_the_check_finds_a_long_function_and_a_long_file(tmp_path):
    pkg = tmp_path / "lorakit"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    (pkg / "long_function.py").write_text(f"def f():\n{body}\n\ndef g():\n    return 1\n")
    (pkg / "long_file.py").write_text("x = 1\n" * 501)
    (pkg / "fine.py").write_text("def f():\n" + "    x = 1\n" * 79 + "x = 2\n" * 420)
    assert too_long(pkg) == ["lorakit/long_file.py (501 lines)", "lorakit/long_function.py:1 f (81 lines)"]
