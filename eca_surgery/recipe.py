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

This module imports neither torch nor timm, so recipes validate instantly.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

RECIPE_VERSION = 1
ACTIONS = ("replace", "insert")
WHERE = ("after", "before")
GATES = ("sigmoid", "hard_sigmoid", "double_sigmoid", "keep")
PLACEMENTS = ("in-blocks", "backbone-end", "feature-branches")

_TOP_KEYS = {"version", "name", "description", "rules"}
_RULE_KEYS = {"action", "where", "select", "eca", "optional"}
_SELECT_KEYS = {"se", "path", "regex", "class", "stages", "blocks", "placement"}
_ECA_KEYS = {"gamma", "b", "kernel_size", "gate"}


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


def _line_map(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Map each field path such as ('rules', 0, 'eca') to its 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines.update(_line_map(value, (*path, key.value)))
            lines[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, i)))
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
            raise self.fail(path, f"expected a mapping, got {_describe(value)}.")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(
                (*path, unknown[0]),
                f"unknown key {unknown[0]!r}; expected one of: {', '.join(sorted(allowed))}.",
            )
        return value

    def number(self, value: Any, path: tuple) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {_describe(value)}.")
        return float(value)

    def boolean(self, value: Any, path: tuple) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_describe(value)}.")
        return value

    def text(self, value: Any, path: tuple) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_describe(value)}.")
        return value

    def recipe(self, data: Any) -> Recipe:
        data = self.mapping(data, (), _TOP_KEYS)
        if "version" not in data:
            raise self.fail((), f"missing required key 'version' (this tool reads version {RECIPE_VERSION}).")
        version = data["version"]
        if type(version) is not int or version != RECIPE_VERSION:
            raise self.fail(
                ("version",),
                f"unsupported version {version!r}; this tool reads version {RECIPE_VERSION}.",
            )
        if "rules" not in data:
            raise self.fail((), "missing required key 'rules' (a list of rules).")
        rules = data["rules"]
        if not isinstance(rules, list) or not rules:
            raise self.fail(("rules",), f"expected a non-empty list of rules, got {_describe(rules)}.")
        name = data.get("name")
        description = data.get("description")
        return Recipe(
            rules=tuple(self.rule(r, ("rules", i)) for i, r in enumerate(rules)),
            version=version,
            name=None if name is None else self.text(name, ("name",)),
            description=None if description is None else self.text(description, ("description",)),
            source=self.source,
            lines=self.lines,
        )

    def rule(self, data: Any, path: tuple) -> Rule:
        data = self.mapping(data, path, _RULE_KEYS)
        if "action" not in data:
            raise self.fail(path, f"missing required key 'action' (one of: {', '.join(ACTIONS)}).")
        action = data["action"]
        if action not in ACTIONS:
            raise self.fail(
                (*path, "action"), f"unknown action {action!r}; expected one of: {', '.join(ACTIONS)}."
            )
        where = data.get("where", "after")
        if "where" in data and action != "insert":
            raise self.fail((*path, "where"), "only an 'insert' rule takes 'where'.")
        if where not in WHERE:
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
            eca=self.eca(data.get("eca") or {}, (*path, "eca")),
            optional=self.boolean(data.get("optional", False), (*path, "optional")),
            where=where,
        )

    def strings(self, value: Any, path: tuple) -> tuple[str, ...]:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise self.fail(path, f"expected a non-empty string or list of strings, got {_describe(value)}.")
        return tuple(values)

    def indices(self, value: Any, path: tuple, words: tuple[str, ...]) -> str | tuple[int, ...]:
        if value in words:
            return value
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(
                path,
                f"expected {' or '.join(map(repr, words))}, an index or a list of indices, got {_describe(value)}.",
            )
        return tuple(values)

    def selector(self, data: Any, path: tuple) -> Selector:
        data = self.mapping(data, path, _SELECT_KEYS)
        regex = self.strings(data["regex"], (*path, "regex")) if "regex" in data else ()
        for i, pattern in enumerate(regex):
            try:
                re.compile(pattern)
            except re.error as exc:
                at = (*path, "regex", i) if isinstance(data["regex"], list) else (*path, "regex")
                raise self.fail(at, f"bad regular expression {pattern!r}: {exc}.") from None
        placement = data.get("placement")
        if placement is not None and placement not in PLACEMENTS:
            raise self.fail(
                (*path, "placement"),
                f"unknown placement {placement!r}; expected one of: {', '.join(PLACEMENTS)}.",
            )
        selector = Selector(
            se=self.boolean(data.get("se", False), (*path, "se")),
            path=self.strings(data["path"], (*path, "path")) if "path" in data else (),
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
        gamma = self.number(data.get("gamma", 2), (*path, "gamma"))
        if gamma == 0:
            raise self.fail((*path, "gamma"), "must not be 0 (the adaptive rule divides by it).")
        b = self.number(data.get("b", 1), (*path, "b"))
        kernel_size = data.get("kernel_size")
        if kernel_size is not None and (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 1
            or kernel_size % 2 == 0
        ):
            raise self.fail(
                (*path, "kernel_size"),
                f"expected a positive odd integer (or null for the adaptive rule), got {_describe(kernel_size)}.",
            )
        gate = data.get("gate", "sigmoid")
        if gate not in GATES:
            raise self.fail((*path, "gate"), f"unknown gate {gate!r}; expected one of: {', '.join(GATES)}.")
        return EcaOptions(gamma=gamma, b=b, kernel_size=kernel_size, gate=gate)


def _field_name(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that mapping keys stay the text they are written as
    (YAML 1.1 would read a key `on` or `no` as a boolean)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    return {
        key.value if isinstance(key, yaml.ScalarNode) else loader.construct_object(key, deep=True): (
            loader.construct_object(value, deep=True)
        )
        for key, value in node.value
    }


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML text (safe loading: plain data only, no Python objects)."""
    try:
        node = yaml.compose(text, Loader=_RecipeLoader)
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"Recipe {source}{where} is not valid YAML: {problem}. Fix the syntax; "
            "`eca-surgery recipes` lists bundled recipes to start from."
        ) from None
    if data is None:
        raise RecipeError(f"Recipe {source} is empty; it needs at least 'version' and 'rules'.")
    return _Validator(source, _line_map(node)).recipe(data)


def recipe_from_dict(data: dict[str, Any], source: str = "<checkpoint metadata>") -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` output (as stored in checkpoints)."""
    return _Validator(source, {}).recipe(data)


def bundled_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name."""
    root = resources.files("eca_surgery") / "recipes"
    if not root.is_dir():  # a checkout that is not installed
        root = Path(__file__).resolve().parent.parent / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a file, or a bundled recipe by name (``se-to-eca``)."""
    path = Path(path_or_name)
    if not path.exists():
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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"Recipe {str(path)!r} cannot be read ({exc}); give a readable UTF-8 YAML file."
        ) from None
    return parse_recipe(text, source=str(path))


def recipe_schema() -> dict[str, Any]:
    """The recipe format as a JSON Schema, for editors that complete and check YAML."""
    indices = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
    strings = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
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
                "oneOf": [{"const": "all"}, {"type": "integer"}, indices],
                "description": "Stages by index into the model's feature_info; negative counts from the end.",
            },
            "blocks": {
                "oneOf": [{"enum": ["all", "last"]}, {"type": "integer"}, indices],
                "description": "Blocks within the selected stages.",
            },
            "placement": {"enum": list(PLACEMENTS), "description": "The article's three placements."},
        },
    }
    eca = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "gamma": {"type": "number", "default": 2, "not": {"const": 0}},
            "b": {"type": "number", "default": 1},
            "kernel_size": {
                "oneOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "not": {"multipleOf": 2}}],
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
            "name": {"type": "string"},
            "description": {"type": "string"},
            "rules": {"type": "array", "items": rule, "minItems": 1},
        },
    }
