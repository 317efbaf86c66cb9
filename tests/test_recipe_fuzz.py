"""The recipe parser fuzzed (issue 11, item 6): random YAML documents, random text, and random
mutations of the bundled recipes, data and text alike.

Every input either loads or raises RecipeError, never anything else, with a short message.
Each input that is YAML the validator gets to judge is also judged by the JSON Schema, and
the two must agree, except where the schema cannot see the problem (SCHEMA_BLIND). The runs
are deterministic (derandomize) and together run 3,000 examples.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from eca_surgery.errors import RecipeError
from eca_surgery.recipe import (
    ACTIONS,
    GATES,
    PLACEMENTS,
    WHERE,
    Recipe,
    _RecipeLoader,  # the loader parse_recipe uses, so the data judged is the data it read
    bundled_recipes,
    parse_recipe,
    recipe_from_dict,
    recipe_schema,
)

EXAMPLES = 1000
MAX_MESSAGE = 600
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

SCHEMA = jsonschema.Draft202012Validator(recipe_schema())

# What the validator refuses and the JSON Schema cannot: (reason, test on the refused data
# and the validator's message). Keep this list short; anything else is a disagreement.
SCHEMA_BLIND: list[tuple[str, Any]] = [
    (
        "a regex or glob that RE2 cannot compile: a schema's pattern cannot check another pattern",
        lambda data, message: re.search(r": bad (regular expression|path pattern) ", message),
    ),
    (
        "NaN: JSON has no NaN, and NaN compares false with every bound",
        lambda data, message: message.endswith("got float nan."),
    ),
    (
        "an integer written as a float (3.0): JSON Schema counts it as an integer, the validator does not",
        lambda data, message: repr(_ints(data)) != repr(data) and _valid_or_blind(_ints(data)),
    ),
]

BUNDLED_TEXT = {name: path.read_text(encoding="utf-8") for name, path in sorted(bundled_recipes().items())}
BUNDLED_DATA = {name: yaml.load(text, Loader=_RecipeLoader) for name, text in BUNDLED_TEXT.items()}
KEYS = sorted(
    {"version", "name", "description", "rules", "action", "where", "select", "eca", "optional"}
    | {"se", "path", "regex", "class", "stages", "blocks", "placement", "gamma", "b", "kernel_size", "gate"}
)
WORDS = [*ACTIONS, *WHERE, *GATES, *PLACEMENTS, "all", "last", "first", "after ", "Sigmoid", ""]
# values at and just past the format's bounds, and values of the wrong kind
EDGES = [
    *(0.25, 0.2499999, 64, 64.0000001, -64, -64.5, 1e308, -1e308, 10**400, math.inf, -math.inf, math.nan),
    *(0, 1, 2, 3, 3.0, 1.0, -1, 1023, 1025, 1024, -1024, -1025, 2**63, True, False, None),
    *("1", "3", "(?=x)", r"(a)\1", "[", "**", "a*b?", "layer\x1b[2J", "x\n", "é\u200b", "a" * 513),
    ["all"],
    [1.0, 2],
    [True],
    [],
    {},
    list(range(65)),
    ["p"] * 65,
]
TEXT_CHARS = st.one_of(
    st.sampled_from(list("abc :-[]{}!&*#|>'\"\n\t 0123456789.,%@`?~<=\\")),
    st.characters(exclude_categories=()),  # control characters and surrogates too
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.sampled_from(EDGES),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=24,
)


# values each key takes in a valid recipe, so that generated rules often come close to one
GOOD = {
    "se": [True, False],
    "path": ["layer1.*", ["**.se", "blocks.?.conv"]],
    "regex": ["layer[12]", ["a|b", ".*"]],
    "class": ["SEModule", ["timm.layers.SqueezeExcite"]],
    "stages": ["all", -1, [0, 1]],
    "blocks": ["all", "last", 0, [-1, 2]],
    "placement": list(PLACEMENTS),
    "gamma": [2, 0.25, 64, 1.5],
    "b": [1, -64, 0, 64.0],
    "kernel_size": [None, 1, 3, 1023],
    "gate": list(GATES),
}


@st.composite
def _fields(draw, names: list[str], min_size: int = 0) -> dict:
    """A mapping of some of ``names``, each mostly with a value that key takes, else any."""
    chosen = draw(st.lists(st.sampled_from(names), min_size=min_size, max_size=3, unique=True))
    value = {
        k: st.one_of(st.sampled_from(GOOD[k]), st.sampled_from(GOOD[k]), st.sampled_from(EDGES), trees)
        for k in chosen
    }
    return {k: draw(value[k]) for k in chosen}


def _rule_like() -> st.SearchStrategy[dict]:
    """Rules with known keys and mostly plausible values, so that many come close to valid."""
    select = _fields(["se", "path", "regex", "class", "stages", "blocks", "placement"], min_size=1)
    return st.fixed_dictionaries(
        {"action": st.sampled_from(ACTIONS), "select": select},
        optional={
            "where": st.sampled_from(WHERE),
            "eca": _fields(["gamma", "b", "kernel_size", "gate"]),
            "optional": st.booleans(),
        },
    )


recipe_like = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1] * 6 + [2, 1.0, True, "1"]),
        "rules": st.lists(_rule_like(), min_size=1, max_size=3),
    },
    optional={
        "name": st.one_of(st.none(), st.text(max_size=30)),
        "description": st.one_of(scalars, st.text()),
    },
)


@st.composite
def dumped(draw, data: st.SearchStrategy) -> str:
    """``data`` written as YAML, block or flow style, Unicode kept or escaped."""
    return yaml.safe_dump(
        draw(data),
        default_flow_style=draw(st.sampled_from([False, True, None])),
        allow_unicode=draw(st.booleans()),
        sort_keys=draw(st.booleans()),
    )


def _ints(data: Any) -> Any:
    """``data`` with every float that has no fractional part written as an int."""
    if isinstance(data, dict):
        return {k: _ints(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_ints(v) for v in data]
    if isinstance(data, float) and math.isfinite(data) and data.is_integer():
        return int(data)
    return data


def _valid_or_blind(data: Any) -> bool:
    """Whether the validator accepts ``data``, or refuses it only for a blind spot of the
    schema (a float-written integer may hide a second one, such as a bad regex)."""
    try:
        recipe_from_dict(data)
    except RecipeError as exc:
        return any(test(data, str(exc)) for _, test in SCHEMA_BLIND)
    return True


def _note(what: str) -> None:
    """Count ``what`` in hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


def check(text: str) -> None:
    """The properties every input must have (see the module docstring)."""
    try:
        recipe = parse_recipe(text, source="<fuzz>")
    except RecipeError as exc:
        message = str(exc)
        assert len(message) <= MAX_MESSAGE, message
        if not message.startswith("Invalid recipe (<fuzz>"):
            _note("refused before validation (YAML syntax, size)")
            return  # refused as YAML, or for its size, before the validator saw any data
        recipe = None
    data = yaml.load(text, Loader=_RecipeLoader)
    if recipe is not None:
        assert recipe_from_dict(recipe.to_dict()) == recipe
        assert not list(SCHEMA.iter_errors(recipe.to_dict()))
        assert not list(SCHEMA.iter_errors(data)), "the JSON Schema refuses a recipe the validator accepts"
        _note("valid")
        return
    try:
        recipe_from_dict(data)
        raise AssertionError("recipe_from_dict accepts data that parse_recipe refused")
    except RecipeError as exc:
        message = str(exc)
    _note("refused by the validator")
    if not list(SCHEMA.iter_errors(data)):
        blind = [reason for reason, applies in SCHEMA_BLIND if applies(data, message)]
        assert blind, f"the JSON Schema accepts a recipe the validator refuses: {message}"
        _note(f"schema blind: {blind[0].split(':')[0]}")


# (a) random YAML documents and random text


@FUZZ
@given(st.one_of(dumped(trees), dumped(recipe_like), st.text(TEXT_CHARS, max_size=200)))
def test_random_yaml_loads_or_raises_recipe_error(text):
    check(text)


# (b) random mutations of the bundled recipes


def _containers(data: Any) -> list:
    """Every dict and list in ``data``, itself included."""
    found, stack = [], [data]
    while stack:
        box = stack.pop()
        if isinstance(box, (dict, list)):
            found.append(box)
            stack.extend(box.values() if isinstance(box, dict) else box)
    return found


def _mutate(draw, data: Any) -> None:
    """One change in place: drop, add or replace a key or item, with any value or an edge one."""
    box = draw(st.sampled_from(_containers(data)))
    op = draw(st.sampled_from(["drop", "add", "replace", "edge"]))
    value = draw(st.sampled_from(EDGES) if op == "edge" else st.one_of(trees, st.sampled_from(WORDS)))
    slots = list(box) if isinstance(box, dict) else list(range(len(box)))
    if op == "add" or not slots:
        if isinstance(box, dict):
            box[draw(keys)] = value
        else:
            box.insert(draw(st.integers(0, len(box))), value)
    elif op == "drop":
        del box[draw(st.sampled_from(slots))]
    else:
        box[draw(st.sampled_from(slots))] = copy.deepcopy(value)


@st.composite
def mutated_data(draw) -> dict:
    data = copy.deepcopy(BUNDLED_DATA[draw(st.sampled_from(sorted(BUNDLED_DATA)))])
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, data)
    return data


@st.composite
def mutated_text(draw) -> str:
    """A bundled recipe's text with lines deleted, repeated or swapped, characters put in or
    changed (control characters and lone surrogates among them), or cut short."""
    lines = BUNDLED_TEXT[draw(st.sampled_from(sorted(BUNDLED_TEXT)))].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["delete", "repeat", "swap", "insert", "change", "cut"]))
        if not lines:
            lines = [draw(st.text(TEXT_CHARS, max_size=20))]
        elif op == "delete":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            at = draw(st.integers(0, len(lines[i])))
            new = draw(st.text(TEXT_CHARS, min_size=1, max_size=8))
            keep = 0 if op == "cut" else at + (1 if op == "change" else 0)
            lines[i] = lines[i][:at] + ("" if op == "cut" else new) + lines[i][keep:]
            if op == "cut":
                lines = lines[: i + 1]
    return "".join(lines)


@FUZZ
@given(dumped(mutated_data()))
def test_mutated_recipe_data_loads_or_raises_recipe_error(text):
    check(text)


@FUZZ
@given(mutated_text())
def test_mutated_recipe_text_loads_or_raises_recipe_error(text):
    check(text)


# the oracle itself


@pytest.mark.parametrize("name", sorted(BUNDLED_TEXT))
def test_bundled_recipes_pass_the_fuzz_checks(name):
    check(BUNDLED_TEXT[name])
    assert isinstance(parse_recipe(BUNDLED_TEXT[name]), Recipe)


@pytest.mark.parametrize(
    "data",
    [
        {"version": 1, "rules": [{"action": "replace", "select": {"regex": "(?=x)"}}]},
        {"version": 1, "rules": [{"action": "replace", "select": {"se": True}, "eca": {"gamma": math.nan}}]},
        {"version": 1.0, "rules": [{"action": "replace", "select": {"stages": [1.0]}}]},
    ],
    ids=["re2", "nan", "integral-float"],
)
def test_each_schema_blind_spot_is_real(data):
    """Each entry of SCHEMA_BLIND names a case the validator refuses and the schema accepts."""
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(data)
    assert not list(SCHEMA.iter_errors(data))
    assert sum(bool(applies(data, str(caught.value))) for _, applies in SCHEMA_BLIND) >= 1
