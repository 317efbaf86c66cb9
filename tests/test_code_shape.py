"""The shape of the code: small functions, and a CLI that only parses, calls and renders."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "eca_surgery"
MAX_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_over_60_lines():
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.glob("*.py"))
        for node in _functions(path)
        if node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, long


def test_the_cli_writes_no_file_and_reads_no_metadata():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    forbidden = {"open", "write_text", "write_bytes", "save_file", "save", "metadata", "save_patched"}
    forbidden |= {"write_checkpoint", "atomic_write_file", "mkdir", "unlink", "rename", "replace"}
    assert not names & forbidden, names & forbidden


def test_the_cli_builds_no_report():
    """Report dicts come from ``eca_surgery.report``: the only dict displays in the CLI are
    its table of flags and the model kwargs that ``--features-only``/``--out-indices`` give."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    flags = next(
        n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "FLAGS"
    )
    others = [
        sorted(str(getattr(k, "value", None)) for k in node.keys)
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict) and node is not flags
    ]
    assert all(set(keys) <= {"features_only", "out_indices"} for keys in others), others
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "dict" not in calls
