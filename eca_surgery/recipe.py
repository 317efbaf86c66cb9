"""The YAML recipe format: reading, validation with line numbers, and bundled recipes.

A recipe is versioned and holds an ordered list of rules, each an action and a
selector::

    version: 1
    rules:
      - action: replace            # put ECA in place of the selected modules
        select: {se: true}         # the built-in SE detector
        eca: {gamma: 2, b: 1}      # or {kernel_size: 5}; gate: sigmoid | hard_sigmoid | double_sigmoid | keep
      - action: insert             # add ECA after (or before) the selected modules
        where: after
        select: {stages: [-1]}     # also: path, regex, class, blocks, placement

Recipes come from other people too, so they are read as untrusted input: the text is
at most 1 MB, nested at most 32 levels, and expands (aliases included) to at most
100,000 nodes; duplicate keys and keys that are not plain words are errors; numbers
must be finite and in range (0.25 <= gamma <= 64, -64 <= b <= 64, kernel_size an odd
integer from 1 to 1023); regular expressions and globs are matched by RE2, in time
linear in the path, so a pattern cannot make matching hang. A null value means "not
given" only where the format says so (``name``, ``description``, and
``eca.kernel_size``, where it asks for the adaptive rule); anywhere else, such as
``eca:`` or ``select:`` with nothing after it, it is an error: leave the key out for
the defaults. Error messages quote at most a short excerpt of the input.

This module imports neither torch nor timm, so recipes validate instantly.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .edits import MAX_KERNEL, Gate, Position
from .errors import RecipeError
from .paths import stat_input
from .recipe_format import (
    Checker,
    Choice,
    Exclusion,
    Field,
    Flag,
    Indices,
    ListOf,
    Number,
    Obj,
    OddInt,
    Patterns,
    Text,
    Version,
    excerpt,
    field_name,
    line_of,
)
from .recipe_format import short_repr as _short_repr

RECIPE_VERSION = 1
ACTIONS = ("replace", "insert")
WHERE = (Position.AFTER.value, Position.BEFORE.value)
GATES = (*(gate.value for gate in Gate), "keep")
PLACEMENTS = ("in-blocks", "backbone-end", "feature-branches")

# Bounds on a recipe, which may come from anyone (see the module docstring).
MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_RULES = 256
MAX_ITEMS = 64  # patterns or indices in one selector criterion
MAX_PATTERN = 512  # characters in one path, regex or class pattern
MAX_INDEX = 1024
MAX_NAME = 200
MAX_DESCRIPTION = 4000
GAMMA_RANGE = (0.25, 64.0)
B_RANGE = (-64.0, 64.0)


@dataclass(frozen=True)
class EcaOptions:
    """How to build each ECA block: the adaptive rule's gamma and b, or a fixed odd kernel size."""

    gamma: float = 2.0
    b: float = 1.0
    kernel_size: int | None = None
    gate: str = Gate.SIGMOID.value


@dataclass(frozen=True)
class Selector:
    """Which modules a rule acts on; a module must satisfy every criterion given.

    ``stages`` and ``blocks`` are ``"all"``, ``"last"`` (blocks only) or tuples of
    indices; ``None`` means the criterion is not given.
    """

    se: bool = False
    path: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    cls: tuple[str, ...] = ()
    stages: str | tuple[int, ...] | None = None
    blocks: str | tuple[int, ...] | None = None
    placement: str | None = None

    def describe(self) -> str:
        """The criteria given, in words: "placement in-blocks", "SE blocks, stages [-1]"."""
        given = self.to_dict()
        parts = [f"placement {given.pop('placement')}"] if "placement" in given else []
        for key, value in given.items():
            if key == "se":
                parts.append("SE blocks")
            elif isinstance(value, list) and isinstance(value[0], str):
                parts.append(f"{key} {' | '.join(value)}")
            else:
                parts.append(f"{key} {value}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The selector in recipe syntax (only the criteria given), in the format's key order."""
        data: dict[str, Any] = {}
        for spec in _SELECTOR.fields:
            value = getattr(self, spec.attr or spec.key)
            if value is not None and value is not False and value != ():
                data[spec.key] = list(value) if isinstance(value, tuple) else value
        return data


@dataclass(frozen=True)
class Rule:
    action: str
    select: Selector
    eca: EcaOptions = field(default_factory=EcaOptions)
    optional: bool = False
    where: str = Position.AFTER.value

    def to_dict(self) -> dict[str, Any]:
        data = {"action": self.action, "select": self.select.to_dict(), "eca": asdict(self.eca)}
        if self.action == "insert" and self.select.placement != "in-blocks":
            data["where"] = self.where
        data["optional"] = self.optional
        return data


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` says where it came from, for messages."""

    rules: tuple[Rule, ...]
    version: int = RECIPE_VERSION
    name: str | None = None
    description: str | None = None
    source: str = field(default="<recipe>", compare=False)
    lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain recipe data, complete with defaults: what checkpoints record."""
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "rules": [r.to_dict() for r in self.rules],
        }

    def where(self, *path: str | int) -> str:
        """'SOURCE, line N: FIELD' for a field of this recipe, for error messages."""
        line = line_of(self.lines, tuple(path))
        at = f"{self.source}, line {line}" if line else self.source
        return f"{at}: {field_name(tuple(path))}"

    def with_insert_gate(self, gate: str) -> Recipe:
        """This recipe with ``gate`` on every insert rule (what ``init='identity'`` records)."""
        rules = tuple(
            replace(r, eca=replace(r.eca, gate=gate)) if r.action == "insert" else r for r in self.rules
        )
        return replace(self, rules=rules)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _line_map(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each field path such as ('rules', 0, 'eca') to its 1-based line in the YAML text.

    Iterative, and a node reached again through an alias is not walked again (its
    fields keep the lines of the anchored original), so the work is linear in the text.
    """
    lines: dict[tuple, int] = {}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [] if root is None else [(root, ())]
    while stack:
        node, path = stack.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[(*path, key.value)] = key.start_mark.line + 1
                    stack.append((value, (*path, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))
    return lines


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str):
    """A dotted-path glob compiled by RE2: ``*`` matches within one segment, ``**`` across,
    ``?`` one character; so that many stars cannot make matching backtrack for ever."""
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": r"[^.]*", "?": r"[^.]"}.get(part, re.escape(part)))
    return compile_regex("".join(out))


def compile_regex(pattern: str):
    """``pattern`` compiled by RE2, which matches in time linear in the text (no backtracking).

    Raises ValueError naming the problem, such as a feature RE2 lacks (backreferences,
    lookaround), which is what makes its matching linear.
    """
    import re2

    return _compile_re2(re2, pattern)


@functools.lru_cache(maxsize=1024)
def _compile_re2(re2, pattern: str):
    options = re2.Options()
    options.log_errors = False  # the error comes back as an exception; no stderr noise
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else str(exc)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(excerpt(str(reason)) + _unsupported(str(reason))) from None


def _unsupported(reason: str) -> str:
    """Why RE2 refuses a feature of Python's re, where that is the cause."""
    if "invalid perl operator: (?=" in reason or "(?!" in reason or "(?<" in reason:
        return " (lookaround is not supported: selectors use RE2 syntax, which matches in linear time)"
    if re.search(r"invalid escape sequence: \\[1-9]", reason):
        return " (backreferences are not supported: selectors use RE2 syntax, which matches in linear time)"
    return ""


# The recipe format, described once: the key sets, the validation (messages naming field
# and line) and recipe_schema() are all derived from these tables (see recipe_format).
# A new key is one Field here plus the record's attribute.

_ECA = Obj(
    EcaOptions,
    (
        Field("gamma", Number(*GAMMA_RANGE), default=2),
        Field("b", Number(*B_RANGE), default=1),
        Field(
            "kernel_size",
            OddInt(MAX_KERNEL, note=" (or null for the adaptive rule)"),
            default=None,
            nullable=True,
            description="A fixed odd kernel size instead of the adaptive rule.",
        ),
        Field("gate", Choice(GATES, "gate"), default=Gate.SIGMOID.value),
    ),
)

_SELECTOR = Obj(
    Selector,
    (
        Field("se", Flag(), description="The built-in SE detector."),
        Field(
            "path",
            Patterns(MAX_PATTERN, MAX_ITEMS, compile_glob, "path pattern"),
            description="Globs over dotted module paths: * within a segment, ** across.",
        ),
        Field(
            "regex",
            Patterns(MAX_PATTERN, MAX_ITEMS, compile_regex, "regular expression"),
            description="Regular expressions that must match a whole module path.",
        ),
        Field(
            "class",
            Patterns(MAX_PATTERN, MAX_ITEMS),
            attr="cls",
            description="Module class, short (SEModule) or qualified name.",
        ),
        Field(
            "stages",
            Indices(("all",), MAX_INDEX, MAX_ITEMS),
            description="Stages by index into the model's feature_info; negative counts from the end.",
        ),
        Field(
            "blocks",
            Indices(("all", "last"), MAX_INDEX, MAX_ITEMS),
            description="Blocks within the selected stages.",
        ),
        Field("placement", Choice(PLACEMENTS, "placement"), description="The article's three placements."),
    ),
    nonempty="selects nothing",
)

_RULE = Obj(
    Rule,
    (
        Field("action", Choice(ACTIONS, "action"), required=f"one of: {', '.join(ACTIONS)}"),
        Field("where", Choice(WHERE), default=Position.AFTER.value, description="For insert rules."),
        Field("select", _SELECTOR, required="which modules the rule acts on"),
        Field("eca", _ECA),
        Field("optional", Flag(), default=False, description="Matching nothing is not an error."),
    ),
    exclusions=(
        Exclusion(("action",), "replace", ("where",), "only an 'insert' rule takes 'where'."),
        Exclusion(
            ("action",),
            "replace",
            ("select", "placement"),
            "a placement adds ECA; use 'action: insert' with it (replace swaps existing modules).",
        ),
        Exclusion(
            ("select", "placement"),
            "in-blocks",
            ("where",),
            "in-blocks fills each block's attention slot; it takes no 'where'.",
        ),
        Exclusion(
            ("action",),
            "insert",
            ("select", "se"),
            "SE blocks are replaced, not inserted after; use 'action: replace'.",
            then_value=True,
        ),
    ),
)

_RECIPE = Obj(
    Recipe,
    (
        Field("version", Version(RECIPE_VERSION), required=f"this tool reads version {RECIPE_VERSION}"),
        Field("rules", ListOf(_RULE, MAX_RULES, "rules"), required="a list of rules"),
        Field("name", Text(MAX_NAME), nullable=True),
        Field("description", Text(MAX_DESCRIPTION, lines=True), nullable=True),
    ),
)


def _validate(data: Any, source: str, lines: dict[tuple, int]) -> Recipe:
    """``data`` (plain YAML data) as a Recipe, or RecipeError naming the field and its line."""
    recipe = _RECIPE.check(Checker(source, lines), data, ())
    return replace(recipe, source=source, lines=lines)


def recipe_schema() -> dict[str, Any]:
    """The recipe format as a JSON Schema, for editors that complete and check YAML.

    What it cannot say: that a regex or glob compiles (RE2 syntax), that a number is not
    NaN (JSON has no NaN), and that an integer is not written as a float such as 3.0
    (JSON Schema counts 3.0 as an integer).
    """
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eca-surgery recipe",
        **_RECIPE.schema(),
    }


class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml's safe loader (libyaml's where available), except that mapping keys stay the text
    they are written as (YAML 1.1 would read a key `on` or `no` as a boolean), must be plain
    scalars, and may not repeat."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    first: dict[str, int] = {}
    for key, _ in node.value:
        if key.tag == _MERGE_TAG:
            continue
        _check_key(key)
        if key.value in first:
            raise ConstructorError(
                None,
                None,
                f"duplicate key {_short_repr(key.value)} (first given on line {first[key.value]}); "
                "give each key once",
                key.start_mark,
            )
        first[key.value] = key.start_mark.line + 1
    loader.flatten_mapping(node)
    for key, _ in node.value:
        _check_key(key)
    return {key.value: loader.construct_object(value, deep=True) for key, value in node.value}


def _check_key(key: yaml.Node) -> None:
    if not isinstance(key, yaml.ScalarNode):
        kind = "a list" if isinstance(key, yaml.SequenceNode) else "a mapping"
        raise ConstructorError(None, None, f"a mapping key must be a plain word, not {kind}", key.start_mark)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _TooBig(Exception):
    """The document breaks one of the bounds on a recipe; the message says which."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def _check_bounds(text: str) -> None:
    """Check nesting depth, alias expansion and the number of documents on yaml's event
    stream, which is read iteratively, before any node or object is built.

    Each alias counts as the whole node it repeats (sizes memoised per anchor), so a
    "billion laughs" document is refused after reading its few hundred bytes.
    """
    sizes: dict[str, int] = {}
    open_anchors: list[tuple[str | None, int]] = []  # (anchor, node count when it began)
    total = documents = 0
    for event in yaml.parse(text, Loader=_RecipeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _TooBig("it holds more than one YAML document (---); a recipe is one document", line)
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_anchors):
                raise _TooBig(f"alias *{excerpt(event.anchor, 40)} refers to a node that holds it", line)
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            total += 1
            if isinstance(event, yaml.CollectionStartEvent):
                open_anchors.append((event.anchor, total - 1))
                if len(open_anchors) > MAX_DEPTH:
                    raise _TooBig(f"it is nested more than {MAX_DEPTH} levels deep", line)
            elif event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = open_anchors.pop()
            if anchor is not None:
                sizes[anchor] = total - start
        if total > MAX_NODES:
            raise _TooBig(
                f"it expands (aliases included) to more than {MAX_NODES:,} values; a recipe needs far fewer",
                line,
            )


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML text (safe loading: plain data only, no Python objects).

    The text is bounded before anything is built from it: size, nesting depth and alias
    expansion (see the module docstring).
    """
    if len(text) > MAX_BYTES:
        raise RecipeError(
            f"Recipe {source} is {len(text):,} characters long; a recipe is at most {MAX_BYTES:,}. "
            "Give a recipe file, not some other file."
        )
    try:
        _check_bounds(text)
        loader = _RecipeLoader(text)
        try:
            node = loader.get_single_node()
            lines = _line_map(node)
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except _TooBig as exc:
        where = f", line {exc.line}" if exc.line else ""
        raise RecipeError(f"Recipe {source}{where} is refused: {exc}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"Recipe {source}{where} is not valid YAML: {excerpt(' '.join(problem.split()))}. Fix the "
            "syntax; `eca-surgery recipes` lists bundled recipes to start from."
        ) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
        raise RecipeError(
            f"Recipe {source} holds a value that cannot be read ({excerpt(str(exc))}). "
            "Fix the value; `eca-surgery recipes` lists bundled recipes to start from."
        ) from None
    if data is None:
        raise RecipeError(f"Recipe {source} is empty; it needs at least 'version' and 'rules'.")
    return _validate(data, source, lines)


def recipe_from_dict(data: dict[str, Any], source: str = "<checkpoint metadata>") -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` output (as stored in checkpoints), checked
    exactly as a recipe file is."""
    try:
        return _validate(data, source, {})
    except RecursionError:
        raise RecipeError(f"Invalid recipe ({source}): it is nested too deeply to read.") from None


def bundled_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name."""
    root = resources.files("eca_surgery") / "recipes"
    if not root.is_dir():  # a checkout that is not installed
        root = Path(__file__).resolve().parent.parent / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a file, or a bundled recipe by name (``se-to-eca``)."""
    path = Path(path_or_name)
    if stat_input(path, "Recipe", RecipeError) is None:
        bundled = bundled_recipes()
        if str(path_or_name) in bundled:
            path = bundled[str(path_or_name)]
        else:
            names = ", ".join(sorted(bundled)) or "none"
            raise RecipeError(
                f"Recipe {str(path_or_name)!r} not found: it is neither a file nor a bundled "
                f"recipe. Give a path to a YAML recipe, or one of the bundled recipes: {names}."
            )
    if path.is_dir():
        raise RecipeError(f"Recipe {str(path)!r} is a directory; give a YAML recipe file.")
    if not path.is_file():  # a device or FIFO could block or never end
        raise RecipeError(f"Recipe {str(path)!r} is not a regular file; give a YAML recipe file.")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise RecipeError(
                f"Recipe {str(path)!r} is larger than {MAX_BYTES:,} bytes, far more than a recipe needs; "
                "give a YAML recipe file."
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"Recipe {str(path)!r} cannot be read ({excerpt(str(exc))}); give a readable UTF-8 YAML file."
        ) from None
    return parse_recipe(text, source=str(path))
