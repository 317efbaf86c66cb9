"""Recipes are untrusted input (issue 10, items 5, 6, 7, 9, 10, 11, 20, 22, 28).

A catalogue of hostile recipes, each run through `recipe check --model`, `inspect -r` and
`convert -r --dry-run`: every one must end in exit code 1 with a short, clean message, no
traceback, nothing written, within seconds. Then one test per item of the issue, and the
JSON Schema tested on invalid recipes as well as valid ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_fail, run_ok

from eca_surgery.errors import RecipeError, SurgeryError
from eca_surgery.recipe import (
    MAX_DESCRIPTION,
    MAX_ITEMS,
    MAX_NAME,
    MAX_PATTERN,
    MAX_RULES,
    load_recipe,
    parse_recipe,
    recipe_from_dict,
    recipe_schema,
)

HEAD = "version: 1\nrules:\n"
SE_RULE = "  - action: replace\n    select: {se: true}\n"
MAX_MESSAGE = 600
MAX_SECONDS = 10.0


def rule_with(eca: str) -> str:
    """A valid SE-replacing recipe whose rule has the given ``eca:`` value."""
    return HEAD + SE_RULE + f"    eca: {eca}\n"


def billion_laughs() -> str:
    """The classic alias bomb: nine levels of nine aliases each, about 700 bytes."""
    lines = ["version: 1", 'lol0: &lol0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * 9) + "]")
    lines.append("rules: *lol9")
    return "\n".join(lines) + "\n"


def mapping_bomb() -> str:
    """An alias bomb built from mappings (merge keys) rather than lists."""
    lines = ["version: 1", "x0: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for level in range(1, 12):
        refs = ", ".join(f"k{j}: *x{level - 1}" for j in range(8))
        lines.append(f"x{level}: &x{level} {{{refs}}}")
    lines.append("rules: [*x11]")
    return "\n".join(lines) + "\n"


def passwd_like() -> str:
    """A large text file that is not a recipe (like the system's password file)."""
    return "".join(f"user{i}:x:{i}:{i}:User {i},,,:/home/user{i}:/bin/bash\n" for i in range(4000))


def many_rules(n: int) -> str:
    return HEAD + "".join("  - {action: replace, select: {se: true}, optional: true}\n" for _ in range(n))


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.fifo"
    os.mkfifo(path)
    return path


# id -> recipe text (str), raw bytes, or a function of tmp_path giving the path to pass
HOSTILE: dict[str, str | bytes | Callable[[Path], Path | str]] = {
    # item 5: size, depth and alias expansion
    "billion-laughs": billion_laughs(),
    "mapping-alias-bomb": mapping_bomb(),
    "recursive-alias": "version: 1\nrules: &r [*r]\n",
    "undefined-alias": "version: 1\nrules: *nowhere\n",
    "anchor-reused-per-rule-100k": "version: 1\nr: &r {action: replace, select: {se: true}}\nrules: ["
    + ", ".join(["*r"] * 100_000)
    + "]\n",
    "over-1MB-of-comments": "# " + "x" * 1_100_000 + "\n" + HEAD + SE_RULE,
    "rules-100k": many_rules(100_000),
    "rules-over-limit": many_rules(MAX_RULES + 1),
    "one-900KB-line": "version: 1\nrules: " + "a" * 900_000 + "\n",
    # item 10: nesting, non-scalar keys
    "nested-300-flow": "version: 1\nrules: " + "[" * 300 + "]" * 300 + "\n",
    "nested-10000-flow": "version: 1\nrules: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "nested-100-block": "version: 1\nrules:\n"
    + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100))
    + "  " * 101
    + "v\n",
    "list-key": rule_with("{[1, 2]: 3}"),
    "mapping-key": rule_with("{{a: 1}: 3}"),
    "complex-key-top": "? [version]\n: 1\nrules: []\n",
    # item 11: duplicate keys, non-mapping eca
    "duplicate-top-rules": HEAD + SE_RULE + "rules:\n  - action: insert\n    select: {path: layer1}\n",
    "duplicate-rule-key": HEAD + SE_RULE + "    action: insert\n",
    "duplicate-eca-key": rule_with("{gamma: 2, gamma: 3}"),
    "eca-list": rule_with("[]"),
    "eca-empty-string": rule_with('""'),
    "eca-null": rule_with(""),
    "eca-number": rule_with("5"),
    "select-null": HEAD + "  - action: replace\n    select:\n",
    "select-list": HEAD + "  - action: replace\n    select: [se]\n",
    "merge-non-mapping": HEAD + "  - <<: [1, 2]\n    action: replace\n    select: {se: true}\n",
    # items 7 and 9: numbers finite and in range
    "gamma-nan": rule_with("{gamma: .nan}"),
    "gamma-inf": rule_with("{gamma: .inf}"),
    "gamma-minus-inf": rule_with("{gamma: -.inf}"),
    "gamma-1e-300": rule_with("{gamma: 1e-300}"),
    "gamma-1e308": rule_with("{gamma: 1.0e+308}"),
    "gamma-1e-7": rule_with("{gamma: 1.0e-7}"),
    "gamma-zero": rule_with("{gamma: 0}"),
    "gamma-negative": rule_with("{gamma: -2}"),
    "gamma-400-digits": rule_with("{gamma: " + "9" * 400 + "}"),
    "gamma-5000-digits": rule_with("{gamma: " + "9" * 5000 + "}"),
    "gamma-bool": rule_with("{gamma: true}"),
    "b-nan": rule_with("{b: .nan}"),
    "b-huge": rule_with("{b: 1.0e+308}"),
    "b-minus-huge": rule_with("{b: -1.0e+308}"),
    "kernel-999999999": rule_with("{kernel_size: 999999999}"),
    "kernel-zero": rule_with("{kernel_size: 0}"),
    "kernel-negative": rule_with("{kernel_size: -3}"),
    "kernel-even": rule_with("{kernel_size: 2}"),
    "kernel-1025": rule_with("{kernel_size: 1025}"),
    "kernel-float": rule_with("{kernel_size: 3.0}"),
    "kernel-string": rule_with('{kernel_size: "3"}'),
    "kernel-inf": rule_with("{kernel_size: .inf}"),
    # need the model: a kernel wider than the channels it slides over
    "kernel-wider-than-channels": rule_with("{kernel_size: 1023}"),
    "gamma-b-give-wide-kernel": rule_with("{gamma: 0.25, b: 64}"),
    "gamma-b-negative-wide-kernel": rule_with("{gamma: 0.25, b: -64}"),
    # item 6: regex and globs
    "regex-catastrophic": HEAD + "  - action: replace\n    select: {regex: '(([a-z0-9_]|\\.)+)+!'}\n",
    "regex-nested-quantifiers": HEAD + "  - action: replace\n    select: {regex: '(a*)*(b+)+$c'}\n",
    "regex-backreference": HEAD + "  - action: replace\n    select: {regex: '(layer)\\1'}\n",
    "regex-lookahead": HEAD + "  - action: replace\n    select: {regex: 'layer(?=1)'}\n",
    "regex-lookbehind": HEAD + "  - action: replace\n    select: {regex: '(?<=layer)1'}\n",
    "regex-unbalanced": HEAD + "  - action: replace\n    select: {regex: 'layer[1-'}\n",
    "regex-huge-repeat": HEAD + "  - action: replace\n    select: {regex: '((a{1000}){1000}){1000}'}\n",
    "regex-too-long": HEAD + "  - action: replace\n    select: {regex: '" + "a" * (MAX_PATTERN + 1) + "'}\n",
    "glob-many-stars": HEAD + "  - action: replace\n    select: {path: '" + "**a" * 60 + "**b'}\n",
    "glob-list-10k": HEAD
    + "  - action: replace\n    select:\n      path: ["
    + ", ".join(f"p{i}" for i in range(10_000))
    + "]\n",
    "stages-list-10k": HEAD
    + "  - action: insert\n    select:\n      stages: ["
    + ", ".join("0" for _ in range(10_000))
    + "]\n",
    "stage-index-1e30": HEAD + "  - action: insert\n    select: {stages: [" + "1" + "0" * 30 + "]}\n",
    "stage-index-out-of-model": HEAD + "  - action: insert\n    select: {stages: [1000]}\n",
    # item 20 and friends: long or strange text is quoted short
    "passwd-like": passwd_like(),
    "long-unknown-key": HEAD + SE_RULE + "    " + "k" * 10_000 + ": 1\n",
    "long-action": HEAD + "  - action: " + "x" * 100_000 + "\n    select: {se: true}\n",
    "long-name": "version: 1\nname: " + "n" * (MAX_NAME + 1) + "\nrules:\n" + SE_RULE,
    "long-description": "version: 1\ndescription: " + "d" * (MAX_DESCRIPTION + 1) + "\nrules:\n" + SE_RULE,
    "long-version-string": "version: '" + "1" * 50_000 + "'\nrules:\n" + SE_RULE,
    "long-yaml-error": "version: 1\nrules: [" + "x" * 50_000 + "\n",
    # unicode, whitespace, encodings
    "homoglyph-action": HEAD + "  - action: r\u0435place\n    select: {se: true}\n",
    "emoji-key": HEAD + SE_RULE + "    \U0001f600: 1\n",
    "rich-markup-value": HEAD + "  - action: '[/][bold red]x[/'\n    select: {se: true}\n",
    "ansi-escape-value": HEAD + '  - action: "\\e[31mred"\n    select: {se: true}\n',
    "tab-indent": "version: 1\nrules:\n\t- action: replace\n\t  select: {se: true}\n",
    "bom-then-tab": "\ufeffversion: 1\nrules:\n\t- x\n",
    "nul-character": "version: 1\x00\nrules: []\n",
    "utf16-bytes": (HEAD + SE_RULE).encode("utf-16"),
    "latin1-bytes": "version: 1\nname: caf\u00e9\n".encode("latin-1"),
    "binary-bytes": bytes(range(256)) * 4,
    "empty-file": "",
    "only-comments": "# nothing here\n",
    "scalar-document": "just words\n",
    "list-document": "- version: 1\n",
    # multi-document and tags
    "two-documents": HEAD + SE_RULE + "---\n" + HEAD + SE_RULE,
    "document-end-then-more": HEAD + SE_RULE + "...\n---\nversion: 2\n",
    "python-object-tag": "version: !!python/object/apply:os.system ['true']\nrules: []\n",
    "python-name-tag": "version: 1\nrules: !!python/name:os.system\n",
    "binary-tag": "version: !!binary aGVsbG8=\nrules: []\n",
    "custom-tag": "version: !mine 1\nrules: []\n",
    "set-tag": "version: 1\nrules: !!set {a, b}\n",
    "timestamp-version": "version: 2001-12-14\nrules:\n" + SE_RULE,
    # versions and types
    "version-string": '"version": "1"\nrules:\n' + SE_RULE,
    "version-float": "version: 1.0\nrules:\n" + SE_RULE,
    "version-huge": "version: " + "1" * 5000 + "\nrules:\n" + SE_RULE,
    "version-list": "version: [1]\nrules:\n" + SE_RULE,
    "action-list": HEAD + "  - action: [replace]\n    select: {se: true}\n",
    "where-mapping": HEAD + "  - action: insert\n    where: {a: 1}\n    select: {path: layer1}\n",
    "gate-list": rule_with("{gate: [sigmoid]}"),
    "placement-mapping": HEAD + "  - action: insert\n    select: {placement: {a: 1}}\n",
    "stages-nested-list": HEAD + "  - action: insert\n    select: {stages: [1, [2]]}\n",
    # files that are not recipe files
    "directory": lambda tmp: tmp,
    "fifo": fifo,
    "dev-zero": lambda tmp: "/dev/zero",
    "dev-null": lambda tmp: "/dev/null",
    "missing-file": lambda tmp: tmp / "missing.yaml",
}


def _recipe_path(tmp_path: Path, case: str) -> str:
    value = HOSTILE[case]
    if callable(value):
        return str(value(tmp_path))
    path = tmp_path / "recipe.yaml"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(value, encoding="utf-8")
    return str(path)


COMMANDS = {
    "check": lambda recipe: ["recipe", "check", recipe, "--model", "seresnet18"],
    "inspect": lambda recipe: ["inspect", "seresnet18", "-r", recipe],
    "convert": lambda recipe: ["convert", "seresnet18", "-r", recipe, "--dry-run"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_recipe(tmp_path, monkeypatch, case, command):
    """Exit 1, a short message, no traceback, nothing written, in seconds."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = _recipe_path(tmp_path, case)
    start = time.perf_counter()
    msg = run_fail(COMMANDS[command](recipe), work)
    took = time.perf_counter() - start
    assert took < MAX_SECONDS, f"{case} took {took:.1f} s"
    assert len(msg) < MAX_MESSAGE, f"{len(msg)} characters: {msg[:1000]}"
    assert "RecursionError" not in msg and "TypeError" not in msg


# item 5: the alias bomb is refused at once, with little memory


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (so that a hang or a memory blow-up ends in a failed
    test, not a stuck suite)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s")


def test_alias_bomb_is_refused_fast_with_little_memory():
    bomb = billion_laughs()
    assert len(bomb) < 800
    code = (
        "import resource, time, tracemalloc\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from eca_surgery.recipe import parse_recipe\n"
        "from eca_surgery.errors import RecipeError\n"
        "tracemalloc.start(); t = time.perf_counter()\n"
        "try:\n"
        f"    parse_recipe({bomb!r}, 'bomb.yaml')\n"
        "except RecipeError as exc:\n"
        "    print(exc)\n"
        "print(time.perf_counter() - t, tracemalloc.get_traced_memory()[1])\n"
    )
    proc = _run_python(code, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, figures = proc.stdout.strip().rsplit("\n", 1)
    seconds, peak = map(float, figures.split())
    assert "alias" in message and "bomb.yaml" in message, message
    assert seconds < 0.5, seconds
    assert peak < 20e6, peak


def test_aliases_within_bounds_still_work():
    text = (
        HEAD
        + "  - action: insert\n    select: {path: layer1}\n    eca: &e {kernel_size: 5}\n"
        + "  - action: insert\n    select: {path: layer2}\n    eca: *e\n"
    )
    recipe = parse_recipe(text)
    assert [r.eca.kernel_size for r in recipe.rules] == [5, 5]


# item 6: regex selectors match in linear time


def test_backtracking_regex_finishes_fast_on_convnext_tiny():
    code = (
        "import time\n"
        "from eca_surgery.models import create_model\n"
        "from eca_surgery.plan import make_plan\n"
        "from eca_surgery.recipe import parse_recipe\n"
        "from eca_surgery.errors import RecipeError\n"
        "model = create_model('convnext_tiny', meta=True)\n"
        'recipe = parse_recipe("version: 1\\nrules:\\n  - action: replace\\n'
        "    select: {regex: '(([a-z0-9_]|\\\\.)+)+!'}\\n\")\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    make_plan(model, recipe, 'convnext_tiny')\n"
        "except RecipeError as exc:\n"
        "    print(exc)\n"
        "print(time.perf_counter() - t)\n"
    )
    proc = _run_python(code, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, seconds = proc.stdout.strip().rsplit("\n", 1)
    assert "matches nothing" in message
    assert float(seconds) < 1.0, seconds


def test_regex_keeps_full_match_semantics():
    from eca_surgery.models import create_model
    from eca_surgery.plan import make_plan

    model = create_model("resnet18", meta=True)
    recipe = parse_recipe(HEAD + "  - action: insert\n    select: {regex: 'layer[23]\\.0\\.conv2'}\n")
    assert [e.path for e in make_plan(model, recipe, "resnet18").edits] == [
        "layer2.0.conv2",
        "layer3.0.conv2",
    ]
    glob = parse_recipe(HEAD + "  - action: insert\n    select: {path: 'layer4.*.conv?'}\n")
    paths = [e.path for e in make_plan(model, glob, "resnet18").edits]
    assert paths == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    # a prefix is not a match
    with pytest.raises(RecipeError, match="matches nothing"):
        make_plan(
            model, parse_recipe(HEAD + "  - action: insert\n    select: {regex: 'layer4\\.0\\.conv'}\n"), "r"
        )


@pytest.mark.parametrize(
    "pattern, feature",
    [("(layer)\\\\1", "backreferences"), ("layer(?=1)", "lookaround"), ("(?<!x)layer", "lookaround")],
)
def test_regex_features_re2_lacks_are_named(pattern, feature):
    with pytest.raises(RecipeError) as info:
        parse_recipe(HEAD + f'  - action: replace\n    select: {{regex: "{pattern}"}}\n', "r.yaml")
    msg = str(info.value)
    assert "r.yaml, line 4" in msg and "rules[0].select.regex" in msg
    assert f"{feature} " in msg and "not supported" in msg and "RE2" in msg


# item 7: kernel sizes and gamma bounded; k <= channels at plan time


@pytest.mark.parametrize(
    "eca, fragment",
    [
        ("{kernel_size: 999999999}", "positive odd integer up to 1023"),
        ("{gamma: 1.0e-7}", "must be between 0.25 and 64"),
        ("{gamma: 100}", "must be between 0.25 and 64"),
        ("{b: 65}", "must be between -64 and 64"),
    ],
)
def test_out_of_range_numbers_are_refused_without_a_model(eca, fragment):
    with pytest.raises(RecipeError, match=fragment):
        parse_recipe(rule_with(eca))


def test_kernel_wider_than_channels_names_module_channels_and_k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(HEAD + "  - action: insert\n    select: {path: layer1}\n    eca: {kernel_size: 101}\n")
    msg = run_fail(["recipe", "check", str(recipe), "--model", "resnet18"], tmp_path)
    assert "'layer1'" in msg and "64 channels" in msg and "size 101" in msg and "line 5" in msg
    recipe.write_text(
        HEAD + "  - action: insert\n    select: {path: layer1}\n    eca: {gamma: 0.25, b: 64}\n"
    )
    msg = run_fail(["convert", "resnet18", "-r", str(recipe), "--dry-run"], tmp_path)
    assert "'layer1'" in msg and "64 channels" in msg and "size 281" in msg and "gamma 0.25 and b 64" in msg


# item 9: numbers are finite, in recipes and in checkpoints' stored recipes


EXTREME = [".nan", ".inf", "-.inf", "1.0e+308", "-1.0e+308", "1" + "0" * 400]


@pytest.mark.parametrize(
    "key, value", [("gamma", v) for v in [*EXTREME, "1.0e-300", "1.0e-7"]] + [("b", v) for v in EXTREME]
)
def test_non_finite_or_extreme_numbers_are_refused(key, value):
    with pytest.raises(RecipeError, match=rf"rules\[0\]\.eca\.{key}"):
        parse_recipe(rule_with(f"{{{key}: {value}}}"))


def _nan_metadata() -> dict[str, str]:
    recipe = {
        "version": 1,
        "name": None,
        "description": None,
        "rules": [
            {
                "action": "insert",
                "select": {"path": ["layer1"]},
                "eca": {"gamma": math.nan, "b": 1.0, "kernel_size": None, "gate": "sigmoid"},
                "where": "after",
                "optional": False,
            }
        ],
    }
    return {
        "format": "eca-surgery",
        "format_version": "1",
        "model": "resnet18",
        "model_kwargs": "{}",
        "recipe": json.dumps(recipe),  # writes NaN, which json.loads reads back
    }


def test_nan_in_a_checkpoints_recipe_is_a_recipe_error():
    from eca_surgery.checkpoint import read_metadata

    with pytest.raises(RecipeError, match=r"x\.safetensors metadata.*rules\[0\]\.eca\.gamma.*finite"):
        read_metadata(_nan_metadata(), "x.safetensors")


def test_verify_of_a_checkpoint_with_a_nan_recipe_fails_cleanly(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "nan.safetensors"
    save_file({"fc.weight": torch.zeros(1)}, str(path), metadata=_nan_metadata())
    msg = run_fail(["verify", str(path)], tmp_path)
    assert "finite" in msg and "gamma" in msg


# item 10: deep nesting and non-scalar keys


@pytest.mark.parametrize("depth", [40, 300, 5000])
def test_deep_nesting_is_a_recipe_error(depth):
    with pytest.raises(RecipeError, match="nested more than 32 levels|maximum nesting depth"):
        parse_recipe("version: 1\nrules: " + "[" * depth + "]" * depth + "\n")


def test_deeply_nested_dict_from_python_is_a_recipe_error():
    data: object = 1
    for _ in range(100_000):
        data = [data]
    with pytest.raises(RecipeError):
        recipe_from_dict({"version": 1, "rules": data})


@pytest.mark.parametrize("key, kind", [("[1, 2]", "a list"), ("{a: 1}", "a mapping")])
def test_non_scalar_keys_are_errors(key, kind):
    with pytest.raises(RecipeError) as info:
        parse_recipe(rule_with(f"{{{key}: 3}}"), "r.yaml")
    assert f"a mapping key must be a plain word, not {kind}" in str(info.value)
    assert "line 5" in str(info.value)


# item 11: duplicate keys; eca must be a mapping


def test_duplicate_top_level_rules_is_an_error_at_the_second():
    text = HEAD + SE_RULE + "rules:\n  - action: insert\n    select: {path: layer1}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    msg = str(info.value)
    assert "r.yaml, line 5" in msg and "duplicate key 'rules'" in msg and "line 2" in msg


@pytest.mark.parametrize(
    "text, line",
    [
        (HEAD + SE_RULE + "    action: insert\n", 5),
        (rule_with("\n      gamma: 2\n      b: 1\n      gamma: 3"), 8),
        ("version: 1\nversion: 1\nrules:\n" + SE_RULE, 2),
    ],
    ids=["rule", "eca", "version"],
)
def test_duplicate_keys_are_errors(text, line):
    with pytest.raises(RecipeError, match=rf"line {line} is not valid YAML: duplicate key"):
        parse_recipe(text)


@pytest.mark.parametrize("eca", ["[]", '""', "", "0", "false", "[kernel_size, 5]"])
def test_eca_must_be_a_mapping(eca):
    with pytest.raises(RecipeError, match=r"rules\[0\]\.eca: expected a mapping"):
        parse_recipe(rule_with(eca))


def test_null_name_and_kernel_size_still_mean_not_given():
    recipe = parse_recipe(
        "version: 1\nname:\ndescription:\nrules:\n" + SE_RULE + "    eca: {kernel_size: null}\n"
    )
    assert recipe.name is None and recipe.rules[0].eca.kernel_size is None
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_a_bom_before_a_valid_recipe_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + SE_RULE).encode())
    assert load_recipe(path).rules[0].select.se


# item 20: messages quote only a short excerpt


def test_large_text_file_is_not_printed_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "passwd"
    path.write_text(passwd_like())
    msg = run_fail(["recipe", "check", str(path)], tmp_path)
    assert len(msg) < 400, msg
    assert "..." in msg and "user2000" not in msg


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="no /etc/passwd")
def test_system_password_file_is_not_printed_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = run_fail(["recipe", "check", "/etc/passwd"], tmp_path)
    assert len(msg) < 400, msg


# item 22: a model that already has ECA


def test_se_to_eca_on_a_model_with_eca_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = run_fail(["recipe", "check", "se-to-eca", "--model", "ecaresnet26t"], tmp_path)
    assert "matches nothing" in msg
    assert "already has 8 ECA blocks" in msg and "layer1.0.se" in msg and "EcaModule" in msg


def test_ceca_blocks_are_recognised():
    from timm.layers import CecaModule
    from torch import nn

    from eca_surgery.plan import make_plan

    model = nn.Sequential(nn.Conv2d(3, 8, 1), CecaModule(kernel_size=3))
    with pytest.raises(RecipeError, match=r"already has 1 ECA block \(e\.g\. at 1, class CecaModule\)"):
        make_plan(model, load_recipe("se-to-eca"), "tiny")


# item 28: the JSON Schema rejects what the validator rejects

VALID_RULE = {"action": "replace", "select": {"se": True}}


def _recipe(rule: dict | None = None, **top) -> dict:
    return {"version": 1, "rules": [rule if rule is not None else VALID_RULE], **top}


def _with_eca(**eca) -> dict:
    return _recipe({**VALID_RULE, "eca": eca})


def _with_select(**select) -> dict:
    return _recipe({"action": "insert", "select": select})


INVALID_DATA = {
    "not-a-mapping": ["version", 1],
    "missing-version": {"rules": [VALID_RULE]},
    "version-string": _recipe(version="1"),
    "version-2": _recipe(version=2),
    "missing-rules": {"version": 1},
    "rules-empty": {"version": 1, "rules": []},
    "rules-mapping": {"version": 1, "rules": VALID_RULE},
    "rules-too-many": {"version": 1, "rules": [VALID_RULE] * (MAX_RULES + 1)},
    "unknown-top-key": _recipe(author="me"),
    "name-number": _recipe(name=5),
    "name-too-long": _recipe(name="n" * (MAX_NAME + 1)),
    "description-list": _recipe(description=["x"]),
    "description-too-long": _recipe(description="d" * (MAX_DESCRIPTION + 1)),
    "rule-not-mapping": _recipe("replace"),
    "rule-missing-action": _recipe({"select": {"se": True}}),
    "rule-missing-select": _recipe({"action": "replace"}),
    "rule-unknown-key": _recipe({**VALID_RULE, "colour": "red"}),
    "action-unknown": _recipe({"action": "swap", "select": {"se": True}}),
    "where-unknown": _recipe({"action": "insert", "where": "middle", "select": {"path": "x"}}),
    "optional-string": _recipe({**VALID_RULE, "optional": "true"}),
    "select-null": _recipe({"action": "replace", "select": None}),
    "select-empty": _recipe({"action": "replace", "select": {}}),
    "select-unknown-key": _with_select(colour="red"),
    "se-string": _recipe({"action": "replace", "select": {"se": "yes"}}),
    "path-number": _with_select(path=5),
    "path-empty-string": _with_select(path=""),
    "path-empty-list": _with_select(path=[]),
    "path-too-long": _with_select(path="p" * (MAX_PATTERN + 1)),
    "path-too-many": _with_select(path=[f"p{i}" for i in range(MAX_ITEMS + 1)]),
    "regex-list-of-numbers": _with_select(regex=[1, 2]),
    "class-mapping": _with_select(**{"class": {"a": 1}}),
    "stages-word": _with_select(stages="first"),
    "stages-too-large": _with_select(stages=[5000]),
    "stages-bool": _with_select(stages=[True]),
    "blocks-word": _with_select(blocks="first"),
    "placement-unknown": _with_select(placement="everywhere"),
    "eca-null": _recipe({**VALID_RULE, "eca": None}),
    "eca-list": _recipe({**VALID_RULE, "eca": []}),
    "eca-string": _recipe({**VALID_RULE, "eca": ""}),
    "eca-unknown-key": _with_eca(colour="red"),
    "gamma-string": _with_eca(gamma="2"),
    "gamma-zero": _with_eca(gamma=0),
    "gamma-tiny": _with_eca(gamma=1e-7),
    "gamma-huge": _with_eca(gamma=1e308),
    # (NaN has no JSON spelling and compares false with any bound, so only the validator can
    # refuse it: see test_non_finite_or_extreme_numbers_are_refused)
    "gamma-inf": _with_eca(gamma=math.inf),
    "gamma-huge-int": _with_eca(gamma=10**400),
    "b-huge": _with_eca(b=65),
    "b-minus-huge": _with_eca(b=-1e308),
    "kernel-even": _with_eca(kernel_size=4),
    "kernel-zero": _with_eca(kernel_size=0),
    "kernel-too-large": _with_eca(kernel_size=1025),
    "kernel-float": _with_eca(kernel_size=3.5),
    "kernel-string": _with_eca(kernel_size="3"),
    "gate-unknown": _with_eca(gate="relu"),
    "name-escape": _recipe(name="\x1b[2Jgone"),
    "description-escape": _recipe(description="line\n\x1b]0;title\x07"),
    "path-escape": _with_select(path="layer1\x1b[31m"),
    "regex-c1-control": _with_select(regex=["layer\x9b1"]),
    # found by tests/test_recipe_fuzz.py: Python's re let the old pattern's $ match before a
    # final newline, and the schema did not state the rules between fields
    "name-final-newline": _recipe(name="x\n"),
    "placement-null": _with_select(placement=None),
    "select-only-se-false": _recipe({"action": "replace", "select": {"se": False}}),
    "insert-se": _recipe({"action": "insert", "select": {"se": True}}),
    "replace-with-where": _recipe({**VALID_RULE, "where": "after"}),
    "replace-with-placement": _recipe({"action": "replace", "select": {"placement": "backbone-end"}}),
    "in-blocks-with-where": _recipe(
        {"action": "insert", "where": "after", "select": {"placement": "in-blocks"}}
    ),
}


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(run_ok(["recipe", "schema"]))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("data", INVALID_DATA.values(), ids=INVALID_DATA.keys())
def test_invalid_recipe_is_rejected_by_validator_and_schema(schema_validator, data):
    with pytest.raises(RecipeError):
        recipe_from_dict(data)
    errors = list(schema_validator.iter_errors(data))
    assert errors, "the JSON Schema accepts a recipe the validator rejects"


def test_schema_accepts_what_checkpoints_record(schema_validator):
    """Recipe.to_dict() (name null, every eca field given) is valid by the schema too."""
    from eca_surgery.recipe import bundled_recipes

    for path in bundled_recipes().values():
        schema_validator.validate(load_recipe(path).to_dict())


def test_schema_is_closed_everywhere():
    """Every object in the schema refuses unknown keys (loosening one is caught here too)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                found.append(node)
                assert node.get("additionalProperties") is False, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe_schema())
    assert len(found) == 4  # recipe, rule, select, eca


def test_yaml_loader_error_types_do_not_escape():
    """Whatever PyYAML raises on odd input reaches the caller as RecipeError only."""
    for text in ("version: 1\nrules: [\n", "a: b: c\n", "\t- x\n", "version: *x\n", "? [a]\n"):
        with pytest.raises(SurgeryError):
            parse_recipe(text)
    assert yaml.__version__
