"""The public API: what ``eca_surgery`` lists, what tools see, and what the benchmarks use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import eca_surgery

ROOT = Path(__file__).parent.parent


def test_every_listed_name_resolves_and_is_in_dir():
    assert set(eca_surgery.__all__) - {"__version__"} == set(eca_surgery._LAZY)
    for name in eca_surgery.__all__:
        assert getattr(eca_surgery, name) is not None, name
    assert set(eca_surgery.__all__) <= set(dir(eca_surgery))


def test_the_jobs_records_and_errors_are_public():
    for name in ("convert", "inspect", "verify", "heal", "load_patched", "Plan", "Recipe", "Edit"):
        assert name in eca_surgery.__all__
    for name in ("Conversion", "HealResult", "HealSettings", "CheckpointRecord", "Provenance"):
        assert isinstance(getattr(eca_surgery, name), type)
    for name in ("SurgeryError", "RecipeError", "CheckpointError", "StoppedBySignal"):
        assert issubclass(getattr(eca_surgery, name), Exception)


def test_type_checkers_see_the_same_names_from_the_same_modules():
    tree = ast.parse((ROOT / "eca_surgery" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == dict(eca_surgery._LAZY)


def test_heal_is_the_function_whatever_was_imported_first():
    code = (
        "import eca_surgery.healing, eca_surgery.cli, eca_surgery.surgery, eca_surgery.checkpoint\n"
        "import eca_surgery, inspect, sys\n"
        "assert inspect.isfunction(eca_surgery.heal), eca_surgery.heal\n"
        "assert inspect.isfunction(eca_surgery.inspect) and inspect.isfunction(eca_surgery.convert)\n"
        "assert inspect.isfunction(eca_surgery.verify)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_top_level_imports_neither_torch_nor_timm():
    code = "import sys, eca_surgery; dir(eca_surgery); assert not {'torch', 'timm'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_benchmarks_use_only_the_public_api():
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eca_surgery"):
                assert node.module == "eca_surgery", f"{script.name}: from {node.module} import ..."
                assert all(a.name in eca_surgery.__all__ for a in node.names), script.name
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("eca_surgery.") for a in node.names), script.name
