"""The shape of the code itself: no function longer than a screen and a half, in seqgen/ and
analysis/ (a long function is where a reader gets lost and a change goes wrong)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 80


def long_functions(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(folder)}:{node.lineno} {node.name} ({lines})")
    return found


def test_no_function_over_80_lines():
    assert long_functions(REPO / "seqgen") + long_functions(REPO / "analysis") == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    found = long_functions(tmp_path)
    assert len(found) == 1 and " long (81)" in found[0]
