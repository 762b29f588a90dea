"""The code's shape (issue 28): no class longer than 250 lines, no function longer than 80, in infer/ and
minimind/."""

import ast

from tests.conftest import ROOT

MAX_CLASS, MAX_FUNCTION = 250, 80
PACKAGES = ("infer", "minimind")


def too_long(source: str, name: str) -> list[str]:
    """Every class over MAX_CLASS lines and function over MAX_FUNCTION lines in `source`, named."""
    found = []
    for node in ast.walk(ast.parse(source)):
        limit = MAX_CLASS if isinstance(node, ast.ClassDef) else (
            MAX_FUNCTION if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            found.append(f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT), path.read_text(encoding="utf-8")


def test_the_checker_finds_a_planted_long_function_and_class():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    assert too_long(f"def f():\n{body}\n", "f.py") == [f"f.py:1 f ({MAX_FUNCTION + 1} lines)"]
    assert too_long(f"def f():\n{body[:-len(str(MAX_FUNCTION - 1)) - 9]}\n", "f.py") == []
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(MAX_CLASS // 3 + 1))
    assert [x.split()[1] for x in too_long(f"class C:\n{methods}", "c.py")] == ["C"]


def test_no_class_over_250_lines_and_no_function_over_80_in_infer_and_minimind():
    found = [x for path, text in sources() for x in too_long(text, str(path))]
    assert not found, "\n".join(found)
