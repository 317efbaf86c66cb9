"""The CLI tried the way a hostile user would, after the library-first refactor (issue 11)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cli_helpers import run_fail, runner, text_of

from eca_surgery.cli import FLAGS, app
from eca_surgery.errors import with_flags


def test_backticks_in_user_text_are_not_rewritten_as_flags(tmp_path: Path, monkeypatch) -> None:
    """with_flags rewrites the library's `name` mentions; a path or model name the user gave
    that holds backticks is shown as written, not as a flag the user never passed."""
    monkeypatch.chdir(tmp_path)
    message = run_fail(["convert", "seresnet18", "-r", "`force`.yaml", "-o", "x.safetensors"], tmp_path)
    assert "'`force`.yaml'" in message and "--force" not in message
    message = run_fail(["inspect", "seres`seed=1`"], tmp_path)
    assert "'seres`seed=1`'" in message and "--seed" not in message
    (tmp_path / "a`seed`.yaml").write_text("rules: []\n")  # shown unquoted: 'Invalid recipe (PATH, line 1)'
    message = run_fail(["recipe", "check", "a`seed`.yaml"], tmp_path)
    assert "a`seed`.yaml" in message and "--seed" not in message


def test_with_flags_leaves_quoted_and_kept_text() -> None:
    message = (
        "Output 'a `force` b' exists; pass `force` or `init='fit-se'`; read c`seed`d and the model's `seed`."
    )
    assert with_flags(message, FLAGS, keep=["c`seed`d"]) == (
        "Output 'a `force` b' exists; pass --force or --init fit-se; read c`seed`d and the model's --seed."
    )


PYTHON_NAME = re.compile(r"`[a-z][a-z0-9_]*(=[^`]*)?`")  # a library's parameter mention, unrewritten


def test_convert_output_names_no_python_parameter(tmp_path: Path) -> None:
    """Before: the calibration line of convert's report (tables and --json) read
    'synthetic: 2 Gaussian-noise inputs of 3x224x224 (no `calib_data`)', a Python name the
    CLI user never typed."""
    out = tmp_path / "m.safetensors"
    args = ["convert", "test_efficientnet", "-r", "se-to-eca", "--init", "fit-se", "--calib-size", "2"]
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, text_of(result)
    calibration = json.loads(result.stdout)["init"]["calibration"]
    assert calibration.startswith("synthetic: 2 Gaussian-noise inputs of ")
    result = runner.invoke(app, [*args, "-o", str(out), "--force"])
    assert result.exit_code == 0, text_of(result)
    for text in (calibration, result.stdout, result.stderr):
        assert not PYTHON_NAME.search(text), text


def test_backticks_in_recipe_text_are_not_rewritten_as_flags(tmp_path: Path) -> None:
    """Before: a selector that matches nothing was quoted unquoted in the message, so
    'path: layer1.`force`' read 'rule 1 (replace path layer1.--force) matches nothing'."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text('version: 1\nrules:\n  - action: replace\n    select: {path: "layer1.`force`"}\n')
    for args in (
        ["recipe", "check", str(recipe), "-m", "seresnet18"],
        ["inspect", "seresnet18", "-r", str(recipe)],
    ):
        message = run_fail(args, tmp_path)
        assert "(replace path layer1.`force`) matches nothing" in message and "--force" not in message
