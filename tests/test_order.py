"""The suite passes in any order and from any working directory (issue 10, item 29)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# an order that once failed: building the wheel switched off setuptools' distutils shim in the
# test process, and torch.compile then failed; test_convert read a recipe relative to the cwd
ORDER = [
    "test_recipes.py::test_bundled_recipes_from_wheel",
    "test_eca.py::test_torch_compile",
    "test_convert.py::test_verify_cli",
]


def test_tests_pass_after_one_another_from_another_directory(tmp_path):
    cwd, basetemp = tmp_path / "elsewhere", tmp_path / "basetemp"
    cwd.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")])),
    }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    args += ["--basetemp", str(basetemp), *(str(TESTS / t) for t in ORDER)]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " failed" not in proc.stdout and " passed" in proc.stdout
    assert list(cwd.iterdir()) == [], "a test wrote into the working directory"
