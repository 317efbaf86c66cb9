"""Bad input through the real CLI: exit code 1, a message naming the problem, no traceback,
and nothing written (no output file, no stray temporary file, existing files untouched)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import timm
from cli_helpers import run_fail, run_ok, runner, text_of
from safetensors.torch import load_file, save_file

from eca_surgery.cli import app

SE_TO_ECA = "se-to-eca"


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory) -> Path:
    """A plain safetensors state_dict of resnet18 (no eca-surgery metadata)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return path


def command_args(command, model, out):
    args = [command, model, "--recipe", SE_TO_ECA]
    return args + ["--output", str(out)] if command == "convert" else args


# 1. unknown model


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_unknown_model_suggests_close_names(tmp_path, command):
    out = tmp_path / "out.safetensors"
    msg = run_fail(command_args(command, "seresnet5O", out), tmp_path, out)
    assert "Unknown model 'seresnet5O'" in msg
    assert "Did you mean" in msg and "seresnet50" in msg


# 2. recipes

RECIPE_HEAD = "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n"

BAD_RECIPES = {
    "invalid-yaml": (
        "version: 1\nrules:\n  - action: replace\n    select: {se: true\n",
        ["not valid YAML", "line 5"],
    ),
    "unknown-key": (
        RECIPE_HEAD + "    eca: {gamma: 2, colour: red}\n",
        ["unknown key 'colour'", "rules[0].eca.colour", "line 5", "gamma"],
    ),
    "unknown-top-key": (
        RECIPE_HEAD + "author: me\n",
        ["unknown key 'author'", "line 5"],
    ),
    "wrong-type": (
        RECIPE_HEAD + "    eca:\n      gamma: abc\n",
        ["rules[0].eca.gamma", "expected a number", "'abc'", "line 6"],
    ),
    "even-kernel": (
        RECIPE_HEAD + "    eca:\n      kernel_size: 4\n",
        ["rules[0].eca.kernel_size", "odd", "4", "line 6"],
    ),
    "wrong-version": (
        RECIPE_HEAD.replace("version: 1", "version: 2"),
        ["unsupported version 2", "reads version 1", "line 1"],
    ),
    "missing-rules": (
        "version: 1\nname: nothing\n",
        ["missing required key 'rules'"],
    ),
    "empty": ("", ["is empty"]),
}


@pytest.mark.parametrize("text, expected", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_bad_recipe(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out.safetensors"
    msg = run_fail(["convert", "seresnet18", "--recipe", str(recipe), "--output", str(out)], tmp_path, out)
    assert str(recipe) in msg
    for fragment in expected:
        assert fragment in msg


def test_missing_recipe_file(tmp_path):
    out = tmp_path / "out.safetensors"
    missing = tmp_path / "nope.yaml"
    msg = run_fail(["convert", "seresnet18", "--recipe", str(missing), "--output", str(out)], tmp_path, out)
    assert f"Recipe '{missing}' not found" in msg
    assert SE_TO_ECA in msg  # lists the bundled recipes


# 3. a recipe that matches nothing


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_recipe_matching_nothing(tmp_path, command):
    out = tmp_path / "out.safetensors"
    msg = run_fail(command_args(command, "resnet18", out), tmp_path, out)
    assert "rule 1 (replace SE blocks) matches nothing in resnet18" in msg
    assert "optional: true" in msg


# 4. source checkpoints


def test_checkpoint_missing(tmp_path):
    out = tmp_path / "out.safetensors"
    ckpt = tmp_path / "nope.safetensors"
    args = ["convert", "seresnet18", "-r", SE_TO_ECA, "-c", str(ckpt), "-o", str(out)]
    msg = run_fail(args, tmp_path, out)
    assert f"Checkpoint '{ckpt}' does not exist" in msg


def test_checkpoint_not_safetensors(tmp_path):
    out = tmp_path / "out.safetensors"
    ckpt = tmp_path / "random.safetensors"
    ckpt.write_bytes(random.Random(0).randbytes(4096))
    msg = run_fail(["convert", "seresnet18", "-r", SE_TO_ECA, "-c", str(ckpt), "-o", str(out)], tmp_path, out)
    assert f"Checkpoint '{ckpt}' is not a readable safetensors file" in msg


def test_checkpoint_of_other_model(tmp_path, resnet18_state):
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", SE_TO_ECA, "-c", str(resnet18_state), "-o", str(out)], tmp_path, out
    )
    assert "does not fit seresnet18" in msg
    assert "32 missing: layer1.0.se.fc1.weight" in msg


def test_checkpoint_with_missing_and_unexpected_keys(tmp_path, resnet18_state):
    state = load_file(str(resnet18_state))
    state["stem.weight"] = state.pop("conv1.weight")
    ckpt = tmp_path / "renamed.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "out.safetensors"
    msg = run_fail(["convert", "seresnet18", "-r", SE_TO_ECA, "-c", str(ckpt), "-o", str(out)], tmp_path, out)
    assert "does not fit seresnet18" in msg
    assert "33 missing: conv1.weight, layer1.0.se.fc1.weight" in msg
    assert "1 unexpected: stem.weight" in msg


# 5. existing output


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    msg = run_fail(["convert", "seresnet18", "-r", SE_TO_ECA, "-o", str(out)], tmp_path)
    assert f"Output '{out}' already exists" in msg and "--force" in msg
    assert out.read_bytes() == b"precious"

    result = runner.invoke(app, ["convert", "seresnet18", "-r", SE_TO_ECA, "-o", str(out), "--force"])
    assert result.exit_code == 0, text_of(result)
    assert out.read_bytes() != b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no stray .*.tmp
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, text_of(verified)


def test_output_folder_missing(tmp_path):
    out = tmp_path / "no-such-dir" / "out.safetensors"
    msg = run_fail(["convert", "seresnet18", "-r", SE_TO_ECA, "-o", str(out)], tmp_path, out)
    assert "folder of output" in msg and "does not exist" in msg


# 6. verify


def test_verify_foreign_safetensors(tmp_path, resnet18_state):
    msg = run_fail(["verify", str(resnet18_state)], tmp_path)
    assert "not written by eca-surgery" in msg
    assert str(resnet18_state) in msg


def test_verify_missing_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    msg = run_fail(["verify", str(path)], tmp_path)
    assert f"'{path}' does not exist" in msg


# 7. missing options


def test_convert_without_recipe(tmp_path):
    out = tmp_path / "out.safetensors"
    msg = run_fail(["convert", "seresnet18", "--output", str(out)], tmp_path, out)
    assert "convert needs --recipe" in msg


def test_convert_without_output(tmp_path):
    msg = run_fail(["convert", "seresnet18", "--recipe", SE_TO_ECA], tmp_path)
    assert "convert needs --output" in msg and "--dry-run" in msg


# Known bug: messages are printed as rich markup, so user text with [brackets] is mangled or crashes.


@pytest.mark.parametrize("kind", ["path", "key"])
def test_message_with_brackets_is_verbatim(tmp_path, kind):
    out = tmp_path / "out.safetensors"
    if kind == "path":
        recipe, shown = str(tmp_path / "my[/x]recipe.yaml"), "my[/x]recipe.yaml"
    else:
        recipe, shown = str(tmp_path / "bad.yaml"), "'[red]colour'"
        Path(recipe).write_text(RECIPE_HEAD + '    eca: {"[red]colour": 1}\n')
    msg = run_fail(["convert", "seresnet18", "--recipe", recipe, "--output", str(out)], tmp_path, out)
    assert shown in msg


# 8. feature-extractor options, scan limits, file modes


@pytest.mark.parametrize(
    "indices,message",
    [
        ("1,9", "resnet18 has 5 feature maps: 0: act1"),
        ("2,2", "repeats an index"),
        ("a,b", "comma-separated"),
    ],
)
def test_bad_out_indices(tmp_path, indices, message):
    args = ["inspect", "resnet18", "-r", "eca-feature-pyramid", "--features-only", "--out-indices", indices]
    assert message in run_fail(args, tmp_path)


def test_scan_limit_applies_to_json_and_must_be_positive(tmp_path):
    import json

    report = json.loads(run_ok(["scan", "seresnet1*", "--limit", "2", "--no-flops", "--json"]))
    assert len(report["models"]) == 2
    result = runner.invoke(app, ["scan", "seresnet1*", "--limit", "0"])
    assert result.exit_code == 2 and "Traceback" not in text_of(result)


def test_outputs_get_ordinary_file_modes(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        out, tdir = tmp_path / "m.safetensors", tmp_path / "timm-dir"
        run_ok(["convert", "seresnet18", "-r", "se-to-eca", "-o", str(out), "--timm-dir", str(tdir)])
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644
    assert tdir.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in tdir.iterdir()} == {0o644}


def test_timm_dir_in_a_missing_folder_writes_nothing(tmp_path):
    out, tdir = tmp_path / "m.safetensors", tmp_path / "no" / "such" / "dir"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "-o", str(out), "--timm-dir", str(tdir)], tmp_path, out
    )
    assert "does not exist; create it first" in msg
