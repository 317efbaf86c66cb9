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
import math
import re
import reprlib
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .errors import RecipeError
from .paths import stat_input

RECIPE_VERSION = 1
ACTIONS = ("replace", "insert")
WHERE = ("after", "before")
GATES = ("sigmoid", "hard_sigmoid", "double_sigmoid", "keep")
PLACEMENTS = ("in-blocks", "backbone-end", "feature-branches")

_TOP_KEYS = {"version", "name", "description", "rules"}
_RULE_KEYS = {"action", "where", "select", "eca", "optional"}
_SELECT_KEYS = {"se", "path", "regex", "class", "stages", "blocks", "placement"}
_ECA_KEYS = {"gamma", "b", "kernel_size", "gate"}

# Bounds on a recipe, which may come from anyone (see the module docstring).
MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_RULES = 256
MAX_ITEMS = 64  # patterns or indices in one selector criterion
MAX_PATTERN = 512  # characters in one path, regex or class pattern
MAX_NAME = 200
MAX_DESCRIPTION = 4000
MAX_INDEX = 1024
GAMMA_RANGE = (0.25, 64.0)
B_RANGE = (-64.0, 64.0)
MAX_KERNEL = 1023
EXCERPT = 80


@dataclass(frozen=True)
class EcaOptions:
    """How to build each ECA block: the adaptive rule's gamma and b, or a fixed odd kernel size."""

    gamma: float = 2.0
    b: float = 1.0
    kernel_size: int | None = None
    gate: str = "sigmoid"


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
        parts = []
        if self.placement:
            parts.append(f"placement {self.placement}")
        if self.se:
            parts.append("SE blocks")
        for label, values in (("path", self.path), ("regex", self.regex), ("class", self.cls)):
            if values:
                parts.append(f"{label} {' | '.join(values)}")
        for label, value in (("stages", self.stages), ("blocks", self.blocks)):
            if value is not None:
                parts.append(f"{label} {value if isinstance(value, str) else list(value)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The selector in recipe syntax (only the criteria given)."""
        data: dict[str, Any] = {}
        if self.se:
            data["se"] = True
        for key, value in (("path", self.path), ("regex", self.regex), ("class", self.cls)):
            if value:
                data[key] = list(value)
        for key, value in (("stages", self.stages), ("blocks", self.blocks)):
            if value is not None:
                data[key] = value if isinstance(value, str) else list(value)
        if self.placement:
            data["placement"] = self.placement
        return data


@dataclass(frozen=True)
class Rule:
    action: str
    select: Selector
    eca: EcaOptions = field(default_factory=EcaOptions)
    optional: bool = False
    where: str = "after"

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
        line = _line_of(self.lines, tuple(path))
        at = f"{self.source}, line {line}" if line else self.source
        return f"{at}: {_field_name(tuple(path))}"

    def with_insert_gate(self, gate: str) -> Recipe:
        """This recipe with ``gate`` on every insert rule (what ``--init identity`` records)."""
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


def _line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


class _Validator:
    """Turns plain YAML data into a Recipe, raising RecipeError that names field and line."""

    def __init__(self, source: str, lines: dict[tuple, int]):
        self.source = source
        self.lines = lines

    def fail(self, path: tuple, problem: str) -> RecipeError:
        where = self.source
        line = _line_of(self.lines, path)
        if line is not None:
            where += f", line {line}"
        field_name = _field_name(path) or "the recipe"
        return RecipeError(f"Invalid recipe ({where}): {field_name}: {problem}")

    def mapping(self, value: Any, path: tuple, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            hint = " (leave the key out for the defaults)" if value is None and path else ""
            raise self.fail(path, f"expected a mapping, got {_describe(value)}{hint}.")
        unknown = sorted(excerpt(str(k), 40) for k in value if k not in allowed)
        if unknown:
            raise self.fail(
                (*path, unknown[0]),
                f"unknown key {unknown[0]!r}; expected one of: {', '.join(sorted(allowed))}.",
            )
        return value

    def number(self, value: Any, path: tuple, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {_describe(value)}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(path, f"expected a finite number, got {_describe(value)}.")
        if not low <= value <= high:  # compares exactly, even for ints too large for a float
            raise self.fail(path, f"must be between {low:g} and {high:g}, got {_describe(value)}.")
        return float(value)

    def boolean(self, value: Any, path: tuple) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_describe(value)}.")
        return value

    def text(self, value: Any, path: tuple, limit: int) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_describe(value)}.")
        if len(value) > limit:
            raise self.fail(path, f"is {len(value)} characters long; at most {limit} are allowed.")
        self.printable(value, path, allowed="\t\n" if path == ("description",) else "")
        return value

    def printable(self, value: str, path: tuple, allowed: str = "") -> None:
        """Refuse control characters (terminal escape sequences among them): recipe text
        is printed, and must not drive the user's terminal."""
        bad = next((c for c in value if c not in allowed and unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise self.fail(path, f"contains the control character {bad!r}; recipe text must be printable.")

    def recipe(self, data: Any) -> Recipe:
        data = self.mapping(data, (), _TOP_KEYS)
        if "version" not in data:
            raise self.fail((), f"missing required key 'version' (this tool reads version {RECIPE_VERSION}).")
        version = data["version"]
        if type(version) is not int or version != RECIPE_VERSION:
            raise self.fail(
                ("version",),
                f"unsupported version {_short_repr(version)}; this tool reads version {RECIPE_VERSION}.",
            )
        if "rules" not in data:
            raise self.fail((), "missing required key 'rules' (a list of rules).")
        rules = data["rules"]
        if not isinstance(rules, list) or not rules:
            raise self.fail(("rules",), f"expected a non-empty list of rules, got {_describe(rules)}.")
        if len(rules) > MAX_RULES:
            raise self.fail(("rules",), f"has {len(rules)} rules; at most {MAX_RULES} are allowed.")
        name = data.get("name")
        description = data.get("description")
        return Recipe(
            rules=tuple(self.rule(r, ("rules", i)) for i, r in enumerate(rules)),
            version=version,
            name=None if name is None else self.text(name, ("name",), MAX_NAME),
            description=None
            if description is None
            else self.text(description, ("description",), MAX_DESCRIPTION),
            source=self.source,
            lines=self.lines,
        )

    def rule(self, data: Any, path: tuple) -> Rule:
        data = self.mapping(data, path, _RULE_KEYS)
        if "action" not in data:
            raise self.fail(path, f"missing required key 'action' (one of: {', '.join(ACTIONS)}).")
        action = data["action"]
        if not _is_one_of(action, ACTIONS):
            raise self.fail(
                (*path, "action"),
                f"unknown action {_short_repr(action)}; expected one of: {', '.join(ACTIONS)}.",
            )
        where = data.get("where", "after")
        if "where" in data and action != "insert":
            raise self.fail((*path, "where"), "only an 'insert' rule takes 'where'.")
        if not _is_one_of(where, WHERE):
            raise self.fail((*path, "where"), f"expected one of: {', '.join(WHERE)}; got {_describe(where)}.")
        if "select" not in data:
            raise self.fail(path, "missing required key 'select' (which modules the rule acts on).")
        select = self.selector(data["select"], (*path, "select"))
        if action == "replace" and select.placement:
            raise self.fail(
                (*path, "select", "placement"),
                "a placement adds ECA; use 'action: insert' with it (replace swaps existing modules).",
            )
        if "where" in data and select.placement == "in-blocks":
            raise self.fail(
                (*path, "where"), "in-blocks fills each block's attention slot; it takes no 'where'."
            )
        if action == "insert" and select.se:
            raise self.fail(
                (*path, "select", "se"), "SE blocks are replaced, not inserted after; use 'action: replace'."
            )
        return Rule(
            action=action,
            select=select,
            eca=self.eca(data.get("eca", {}), (*path, "eca")),
            optional=self.boolean(data.get("optional", False), (*path, "optional")),
            where=where,
        )

    def items(self, value: Any, path: tuple) -> list:
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_ITEMS:
            raise self.fail(path, f"lists {len(values)} items; at most {MAX_ITEMS} are allowed.")
        return values

    def strings(self, value: Any, path: tuple) -> tuple[str, ...]:
        values = self.items(value, path)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise self.fail(path, f"expected a non-empty string or list of strings, got {_describe(value)}.")
        for i, v in enumerate(values):
            if len(v) > MAX_PATTERN:
                at = (*path, i) if isinstance(value, list) else path
                raise self.fail(at, f"is {len(v)} characters long; at most {MAX_PATTERN} are allowed.")
            self.printable(v, (*path, i) if isinstance(value, list) else path)
        return tuple(values)

    def indices(self, value: Any, path: tuple, words: tuple[str, ...]) -> str | tuple[int, ...]:
        if _is_one_of(value, words):
            return value
        values = self.items(value, path)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(
                path,
                f"expected {' or '.join(map(repr, words))}, an index or a list of indices, got {_describe(value)}.",
            )
        for v in values:
            if not -MAX_INDEX <= v <= MAX_INDEX:
                raise self.fail(path, f"index {_short_repr(v)} is out of range -{MAX_INDEX}..{MAX_INDEX}.")
        return tuple(values)

    def selector(self, data: Any, path: tuple) -> Selector:
        data = self.mapping(data, path, _SELECT_KEYS)
        regex = self.strings(data["regex"], (*path, "regex")) if "regex" in data else ()
        globs = self.strings(data["path"], (*path, "path")) if "path" in data else ()
        for key, patterns, compile_, what in (
            ("regex", regex, compile_regex, "regular expression"),
            ("path", globs, compile_glob, "path pattern"),
        ):
            for i, pattern in enumerate(patterns):
                try:
                    compile_(pattern)
                except ValueError as exc:
                    at = (*path, key, i) if isinstance(data[key], list) else (*path, key)
                    raise self.fail(at, f"bad {what} {_short_repr(pattern)}: {exc}.") from None
        placement = data.get("placement")
        if placement is not None and not _is_one_of(placement, PLACEMENTS):
            raise self.fail(
                (*path, "placement"),
                f"unknown placement {_short_repr(placement)}; expected one of: {', '.join(PLACEMENTS)}.",
            )
        selector = Selector(
            se=self.boolean(data.get("se", False), (*path, "se")),
            path=globs,
            regex=regex,
            cls=self.strings(data["class"], (*path, "class")) if "class" in data else (),
            stages=self.indices(data["stages"], (*path, "stages"), ("all",)) if "stages" in data else None,
            blocks=self.indices(data["blocks"], (*path, "blocks"), ("all", "last"))
            if "blocks" in data
            else None,
            placement=placement,
        )
        if not selector.to_dict():
            raise self.fail(
                path, "selects nothing; give at least one of: " + ", ".join(sorted(_SELECT_KEYS)) + "."
            )
        return selector

    def eca(self, data: Any, path: tuple) -> EcaOptions:
        data = self.mapping(data, path, _ECA_KEYS)
        gamma = self.number(data.get("gamma", 2), (*path, "gamma"), *GAMMA_RANGE)
        b = self.number(data.get("b", 1), (*path, "b"), *B_RANGE)
        kernel_size = data.get("kernel_size")
        if kernel_size is not None and (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or not 1 <= kernel_size <= MAX_KERNEL
            or kernel_size % 2 == 0
        ):
            raise self.fail(
                (*path, "kernel_size"),
                f"expected a positive odd integer up to {MAX_KERNEL} (or null for the adaptive rule), "
                f"got {_describe(kernel_size)}.",
            )
        gate = data.get("gate", "sigmoid")
        if not _is_one_of(gate, GATES):
            raise self.fail(
                (*path, "gate"), f"unknown gate {_short_repr(gate)}; expected one of: {', '.join(GATES)}."
            )
        return EcaOptions(gamma=gamma, b=b, kernel_size=kernel_size, gate=gate)


def _is_one_of(value: Any, words: tuple[str, ...]) -> bool:
    """``value in words`` for any value: a list or mapping (unhashable) is simply not one."""
    return isinstance(value, str) and value in words


def _field_name(path: tuple) -> str:
    out = ""
    for part in path:
        part = part if isinstance(part, int) else excerpt(str(part), 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT
_REPR.maxlevel = 3


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: Any) -> str:
    """repr(value), bounded in length and nesting, for quoting untrusted input in messages."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a structure too deep
        text = f"<{type(value).__name__}>"
    return excerpt(text)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {_short_repr(value)}"


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
    return _Validator(source, lines).recipe(data)


def recipe_from_dict(data: dict[str, Any], source: str = "<checkpoint metadata>") -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` output (as stored in checkpoints), checked
    exactly as a recipe file is."""
    try:
        return _Validator(source, {}).recipe(data)
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


# no control characters (Unicode category Cc), as the validator's ``printable``; the
# description may also hold tabs and newlines
_PRINTABLE = r"^[^\u0000-\u001f\u007f-\u009f]*$"
_PRINTABLE_LINES = r"^[^\u0000-\u0008\u000b-\u001f\u007f-\u009f]*$"


def recipe_schema() -> dict[str, Any]:
    """The recipe format as a JSON Schema, for editors that complete and check YAML."""
    index = {"type": "integer", "minimum": -MAX_INDEX, "maximum": MAX_INDEX}
    indices = {"type": "array", "items": index, "minItems": 1, "maxItems": MAX_ITEMS}
    pattern = {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN, "pattern": _PRINTABLE}
    strings = {
        "oneOf": [
            pattern,
            {"type": "array", "items": pattern, "minItems": 1, "maxItems": MAX_ITEMS},
        ]
    }
    selector = {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "se": {"type": "boolean", "description": "The built-in SE detector."},
            "path": {
                **strings,
                "description": "Globs over dotted module paths: * within a segment, ** across.",
            },
            "regex": {**strings, "description": "Regular expressions that must match a whole module path."},
            "class": {**strings, "description": "Module class, short (SEModule) or qualified name."},
            "stages": {
                "oneOf": [{"const": "all"}, index, indices],
                "description": "Stages by index into the model's feature_info; negative counts from the end.",
            },
            "blocks": {
                "oneOf": [{"enum": ["all", "last"]}, index, indices],
                "description": "Blocks within the selected stages.",
            },
            "placement": {"enum": list(PLACEMENTS), "description": "The article's three placements."},
        },
    }
    eca = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "gamma": {"type": "number", "minimum": GAMMA_RANGE[0], "maximum": GAMMA_RANGE[1], "default": 2},
            "b": {"type": "number", "minimum": B_RANGE[0], "maximum": B_RANGE[1], "default": 1},
            "kernel_size": {
                "oneOf": [
                    {"type": "null"},
                    {"type": "integer", "minimum": 1, "maximum": MAX_KERNEL, "not": {"multipleOf": 2}},
                ],
                "default": None,
                "description": "A fixed odd kernel size instead of the adaptive rule.",
            },
            "gate": {"enum": list(GATES), "default": "sigmoid"},
        },
    }
    rule = {
        "type": "object",
        "additionalProperties": False,
        "required": ["action", "select"],
        "properties": {
            "action": {"enum": list(ACTIONS)},
            "where": {"enum": list(WHERE), "default": "after", "description": "For insert rules."},
            "select": selector,
            "eca": eca,
            "optional": {
                "type": "boolean",
                "default": False,
                "description": "Matching nothing is not an error.",
            },
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eca-surgery recipe",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "rules"],
        "properties": {
            "version": {"const": RECIPE_VERSION},
            "name": {"type": ["string", "null"], "maxLength": MAX_NAME, "pattern": _PRINTABLE},
            "description": {
                "type": ["string", "null"],
                "maxLength": MAX_DESCRIPTION,
                "pattern": _PRINTABLE_LINES,
            },
            "rules": {"type": "array", "items": rule, "minItems": 1, "maxItems": MAX_RULES},
        },
    }
