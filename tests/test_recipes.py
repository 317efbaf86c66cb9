"""The recipe format through the real CLI: validation errors name the field, its YAML line and
what was expected; model-dependent errors name the rule and suggest fixes; the bundled recipes
are listed, valid, described by the JSON Schema, shipped in the wheel, and round-trip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_fail, run_ok

from eca_surgery.errors import RecipeError
from eca_surgery.recipe import bundled_recipes, load_recipe, parse_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ("se-to-eca", "eca-in-blocks", "eca-after-stages", "eca-backbone-end", "eca-feature-pyramid")


def squash(text: str) -> str:
    """``text`` without whitespace, so that rich's line wrapping does not matter."""
    return re.sub(r"\s", "", text)


def has_line(msg: str, line: int) -> bool:
    return re.search(rf"\bline {line}\b", msg) is not None


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# 1. validation errors of the recipe format (no model needed)

# A valid replace rule and a valid insert rule; cases append lines to them (line numbers in comments).
REPLACE = """\
version: 1
rules:
  - action: replace
    select:
      se: true
"""  # lines 1-5
INSERT = """\
version: 1
rules:
  - action: insert
    select:
      path: layer1
"""  # lines 1-5

# id: (recipe text, field named, line of that field, fragments saying what was expected)
INVALID = {
    "unknown-top-key": (REPLACE + "author: me\n", "author", 6, ["unknown key 'author'", "rules", "version"]),
    "unknown-top-key-after-header": (
        "# a header comment\n#\n# more words\n" + REPLACE + "author: me\n",
        "author",
        9,
        ["unknown key 'author'", "description", "name"],
    ),
    "unknown-rule-key": (
        REPLACE + "    colour: red\n",
        "rules[0].colour",
        6,
        ["unknown key 'colour'", "action", "eca", "optional", "select", "where"],
    ),
    "unknown-selector-key": (
        REPLACE + "      colour: red\n",
        "rules[0].select.colour",
        6,
        ["unknown key 'colour'", "blocks", "class", "path", "placement", "regex", "stages"],
    ),
    "unknown-eca-key": (
        REPLACE + "    eca:\n      gamma: 2\n      colour: red\n",
        "rules[0].eca.colour",
        8,
        ["unknown key 'colour'", "gamma", "kernel_size", "gate"],
    ),
    "gamma-string": (
        REPLACE + '    eca:\n      gamma: "2"\n',
        "rules[0].eca.gamma",
        7,
        ["expected a number", "'2'"],
    ),
    "optional-not-bool": (
        REPLACE + '    optional: "true"\n',
        "rules[0].optional",
        6,
        ["expected true or false", "'true'"],
    ),
    "path-number": (
        INSERT.replace("path: layer1", "path: 5"),
        "rules[0].select.path",
        5,
        ["expected a non-empty string or list of strings", "int 5"],
    ),
    "stages-string": (
        INSERT + "      stages: first\n",
        "rules[0].select.stages",
        6,
        ["expected 'all'", "index or a list of indices", "'first'"],
    ),
    "blocks-first": (
        INSERT + "      blocks: first\n",
        "rules[0].select.blocks",
        6,
        ["expected 'all' or 'last'", "index or a list of indices", "'first'"],
    ),
    "bad-regex": (
        INSERT + '      regex: "layer[1-"\n',
        "rules[0].select.regex",
        6,
        ["bad regular expression", "'layer[1-'"],
    ),
    "bad-regex-in-list": (
        INSERT + '      regex:\n        - "layer1"\n        - "layer[1-"\n',
        "rules[0].select.regex[1]",
        8,
        ["bad regular expression", "'layer[1-'"],
    ),
    "unknown-action": (
        REPLACE.replace("action: replace", "action: swap"),
        "rules[0].action",
        3,
        ["unknown action 'swap'", "replace", "insert"],
    ),
    "unknown-placement": (
        INSERT + "      placement: everywhere\n",
        "rules[0].select.placement",
        6,
        ["unknown placement 'everywhere'", "in-blocks", "backbone-end", "feature-branches"],
    ),
    "where-on-replace": (
        REPLACE + "    where: after\n",
        "rules[0].where",
        6,
        ["only an 'insert' rule takes 'where'"],
    ),
    "where-middle": (
        INSERT + "    where: middle\n",
        "rules[0].where",
        6,
        ["after", "before", "'middle'"],
    ),
    "where-on-in-blocks": (
        INSERT + "      placement: in-blocks\n    where: before\n",
        "rules[0].where",
        7,
        ["takes no 'where'"],
    ),
    "placement-on-replace": (
        REPLACE + "      placement: in-blocks\n",
        "rules[0].select.placement",
        6,
        ["action: insert"],
    ),
    "se-on-insert": (
        INSERT + "      se: true\n",
        "rules[0].select.se",
        6,
        ["action: replace"],
    ),
    "empty-select": (
        "version: 1\nrules:\n  - action: insert\n    select: {}\n",
        "rules[0].select",
        4,
        ["selects nothing", "at least one of", "path", "stages"],
    ),
    "even-kernel-size": (
        REPLACE + "    eca:\n      kernel_size: 4\n",
        "rules[0].eca.kernel_size",
        7,
        ["positive odd integer", "4"],
    ),
    "second-rule": (
        REPLACE + "  - action: insert\n    select:\n      blocks: first\n",
        "rules[1].select.blocks",
        8,
        ["expected 'all' or 'last'", "'first'"],
    ),
    "version-2": (
        REPLACE.replace("version: 1", "version: 2"),
        "version",
        1,
        ["unsupported version 2", "reads version 1"],
    ),
    "missing-rules": (
        "version: 1\nname: nothing\n",
        "rules",
        1,
        ["missing required key 'rules'", "list of rules"],
    ),
    "empty-rules": (
        "version: 1\nname: nothing\nrules: []\n",
        "rules",
        3,
        ["expected a non-empty list of rules", "[]"],
    ),
}


@pytest.mark.parametrize("text, field, line, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_recipe(tmp_path, text, field, line, expected):
    recipe = write(tmp_path, text)
    msg = run_fail(["recipe", "check", str(recipe)], tmp_path)
    assert str(recipe) in msg
    assert field in msg
    assert has_line(msg, line), f"expected 'line {line}' in: {msg}"
    for fragment in expected:
        assert fragment in msg

    # the Python API raises the same message
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source=str(recipe))
    assert " ".join(str(info.value).split()) in msg


def test_unknown_boolean_like_key_names_its_text_and_line():
    # YAML 1.1 would read the key `on` as True; keys stay text
    with pytest.raises(RecipeError) as info:
        parse_recipe(REPLACE + "on: 1\n", source="r.yaml")
    msg = str(info.value)
    assert has_line(msg, 6), msg
    assert "'on'" in msg
    with pytest.raises(RecipeError, match="unsupported version 1.0"):
        parse_recipe("version: 1.0\nrules: []\n")


# 2. errors that depend on the model


def fail_on_model(tmp_path: Path, mode: str, text: str) -> str:
    """Write recipe ``text``, run it against resnet18 (check or convert), expect a clean error."""
    recipe = write(tmp_path, text)
    out = tmp_path / "out.safetensors"
    return run_fail(_model_args(mode, recipe, out), tmp_path, out)


def _model_args(mode: str, recipe: Path, out: Path, model: str = "resnet18") -> list[str]:
    if mode == "check":
        return ["recipe", "check", str(recipe), "--model", model]
    return ["convert", model, "--recipe", str(recipe), "--output", str(out)]


MODES = ["check", "convert"]


@pytest.mark.parametrize("mode", MODES)
def test_stage_out_of_range(tmp_path, mode):
    msg = fail_on_model(
        tmp_path, mode, "version: 1\nrules:\n  - action: insert\n    select:\n      stages: [7]\n"
    )
    assert "rules[0].select.stages" in msg and has_line(msg, 5), msg
    assert "index 7 is out of range" in msg
    for stage in ("act1", "layer1", "layer4"):
        assert stage in msg


@pytest.mark.parametrize("mode", MODES)
def test_path_matching_nothing_suggests_close_paths(tmp_path, mode):
    msg = fail_on_model(
        tmp_path, mode, 'version: 1\nrules:\n  - action: insert\n    select:\n      path: "layer1.0.bn9"\n'
    )
    assert "rules[0]" in msg and has_line(msg, 3), msg
    assert "matches nothing in resnet18" in msg
    assert "layer1.0.bn1" in msg or "layer1.0.bn2" in msg
    assert "optional: true" in msg


@pytest.mark.parametrize("mode", MODES)
def test_class_matching_nothing_suggests_close_classes(tmp_path, mode):
    msg = fail_on_model(
        tmp_path, mode, "version: 1\nrules:\n  - action: insert\n    select:\n      class: BatchNorm3d\n"
    )
    assert "rules[0]" in msg and has_line(msg, 3), msg
    assert "matches nothing in resnet18" in msg
    assert "BatchNorm2d" in msg


def test_optional_rule_may_match_nothing(tmp_path):
    recipe = write(
        tmp_path,
        'version: 1\nrules:\n  - action: insert\n    optional: true\n    select:\n      path: "layer1.0.bn9"\n',
    )
    stdout = run_ok(["recipe", "check", str(recipe), "--model", "resnet18"])
    assert "validrecipe" in squash(stdout)


@pytest.mark.parametrize("mode", MODES)
def test_two_rules_changing_one_module(tmp_path, mode):
    text = (
        "version: 1\nrules:\n"
        "  - action: insert\n    select:\n      path: layer1\n"
        "  - action: insert\n    where: after\n    select:\n      stages: [1]\n"
    )
    msg = fail_on_model(tmp_path, mode, text)
    assert "rules 1 and 2" in msg
    assert "'layer1'" in msg


@pytest.mark.parametrize("mode", MODES)
def test_feature_branches_need_features_only(tmp_path, mode):
    msg = fail_on_model(
        tmp_path,
        mode,
        "version: 1\nrules:\n  - action: insert\n    select:\n      placement: feature-branches\n",
    )
    assert "rules[0].select.placement" in msg and has_line(msg, 5), msg
    assert "features_only" in msg and "--features-only" in msg


def test_feature_branches_with_features_only(tmp_path):
    stdout = run_ok(["recipe", "check", "eca-feature-pyramid", "--model", "resnet18", "--features-only"])
    assert "validrecipe" in squash(stdout)


# 3. the bundled recipes


def test_bundled_recipes_are_listed_with_descriptions():
    assert set(bundled_recipes()) == set(BUNDLED)
    squashed = re.sub(r"[│┃]", "", squash(run_ok(["recipes"])))
    for name in BUNDLED:
        description = load_recipe(name).description
        assert description, name
        assert name + squash(description) in squashed, name


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_file(name):
    path = bundled_recipes()[name]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and name in first, f"{path} should start with a comment header"
    assert load_recipe(name).name == name


@pytest.mark.parametrize("name", BUNDLED)
def test_recipe_check_by_name(name):
    stdout = run_ok(["recipe", "check", name])
    assert "validrecipe" in squash(stdout)


def test_format_description_agrees_with_the_records():
    """The format's one description (recipe._RECIPE and the objects in it) and the record
    classes say the same: each key's default is the record's default, and each key fills a
    field of its record."""
    import dataclasses

    from eca_surgery import recipe
    from eca_surgery.recipe_format import MISSING, Checker

    for obj in (recipe._RECIPE, recipe._RULE, recipe._SELECTOR, recipe._ECA):
        record_fields = {f.name: f for f in dataclasses.fields(obj.record)}
        for spec in obj.fields:
            field = record_fields[spec.attr or spec.key]
            if spec.default is not MISSING:
                assert spec.check(Checker("<test>", {}), spec.default, ()) == field.default, spec.key
    assert recipe._SELECTOR.keys == {"se", "path", "regex", "class", "stages", "blocks", "placement"}
    rule = recipe.recipe_schema()["properties"]["rules"]["items"]
    assert set(rule["properties"]["select"]["properties"]) == recipe._SELECTOR.keys


def test_recipe_schema():
    schema = json.loads(run_ok(["recipe", "schema"]))
    assert "$schema" in schema
    assert "rules" in schema["properties"]
    assert set(schema["required"]) >= {"version", "rules"}

    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    for name in BUNDLED:
        data = yaml.safe_load(bundled_recipes()[name].read_text(encoding="utf-8"))
        validator(schema).validate(data)


# 4. bundled recipes from an installed wheel, not the checkout

_NETWORK_ERRORS = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "Connection refused",
)

_WHEEL_SCRIPT = """
import json
import eca_surgery
from eca_surgery.recipe import bundled_recipes, load_recipe

found = bundled_recipes()
print(json.dumps({
    "package": eca_surgery.__file__,
    "recipes": {name: str(path) for name, path in found.items()},
    "loaded": {name: load_recipe(name).name for name in found},
}))
"""


def _pip_wheel(src: Path, wheels: Path, isolated: bool) -> subprocess.CompletedProcess:
    flags = [] if isolated else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-w", str(wheels), str(src)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the checkout (building in place would write build/ into the repo).

    Without build isolation where this environment has setuptools (no network needed),
    else with it, which fetches setuptools; skipped where that needs a network there is not.
    """
    # asked in a subprocess: find_spec("pip") here would switch off setuptools' distutils shim
    # for the rest of the session (and break torch.compile in a later test)
    if subprocess.run([sys.executable, "-c", "import pip"], capture_output=True).returncode != 0:
        pytest.skip("pip is needed to build the wheel")
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.safetensors"
        ),
    )
    wheels = tmp_path / "wheels"
    # setuptools is imported in a subprocess: importing it here, after torch, upsets its distutils shim
    local = subprocess.run([sys.executable, "-c", "import setuptools"], capture_output=True).returncode == 0
    proc = _pip_wheel(src, wheels, isolated=False) if local else None
    if proc is None or proc.returncode != 0:
        try:
            proc = _pip_wheel(src, wheels, isolated=True)
        except subprocess.TimeoutExpired:
            pytest.skip("building the wheel timed out fetching setuptools (no network?)")
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 and any(e in log for e in _NETWORK_ERRORS):
            pytest.skip("cannot build the wheel: setuptools could not be fetched (no network)")
        assert proc.returncode == 0, f"building the wheel failed:\n{log[-4000:]}"
    found = sorted(wheels.glob("eca_surgery-*.whl"))
    assert len(found) == 1, found
    return found[0]


def test_bundled_recipes_from_wheel(tmp_path):
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert {f"eca_surgery/recipes/{n}.yaml" for n in BUNDLED} <= set(zf.namelist())
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    proc = subprocess.run(
        [sys.executable, "-c", _WHEEL_SCRIPT], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).resolve().is_relative_to(site.resolve()), report["package"]
    assert set(report["recipes"]) == set(BUNDLED)
    for name, path in report["recipes"].items():
        assert Path(path).resolve().is_relative_to(site.resolve()), path
        assert report["loaded"][name] == name

    # and by name through the installed CLI
    proc = subprocess.run(
        [sys.executable, "-m", "eca_surgery", "recipe", "check", "se-to-eca"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validrecipe" in squash(proc.stdout)
    assert squash(str(site / "eca_surgery" / "recipes" / "se-to-eca.yaml")) in squash(proc.stdout)


# 5. round trip through to_dict (what checkpoints record)

FULL = """\
version: 1
name: full
description: Every field.
rules:
  - action: replace
    select: {se: true, stages: all}
    eca: {gamma: 3, b: 0.5, gate: keep}
  - action: insert
    where: before
    optional: true
    select:
      path: [layer1, "layer2.*"]
      regex: 'layer\\d\\.0'
      class: [Sequential, BasicBlock]
      stages: -1
      blocks: last
    eca: {kernel_size: 5, gate: hard_sigmoid}
  - action: insert
    select: {placement: in-blocks, blocks: [0, -1]}
"""


@pytest.mark.parametrize("name", [*BUNDLED, "full"])
def test_round_trip(name):
    recipe = parse_recipe(FULL, source="full.yaml") if name == "full" else load_recipe(name)
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    assert recipe_from_dict(json.loads(recipe.to_json())) == recipe
