"""The YAML recipe format: reading, validation with line numbers, and bundled recipes.

A recipe is versioned and holds an ordered list of rules::

    version: 1
    rules:
      - action: replace        # put ECA in place of the selected modules
        select: {se: true}     # the built-in SE detector
        eca: {gamma: 2, b: 1}  # or {kernel_size: 5}; gate: sigmoid | hard_sigmoid | keep

This module imports neither torch nor timm, so recipes validate instantly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

RECIPE_VERSION = 1
ACTIONS = ("replace",)
GATES = ("sigmoid", "hard_sigmoid", "keep")

_TOP_KEYS = {"version", "name", "description", "rules"}
_RULE_KEYS = {"action", "select", "eca", "optional"}
_SELECT_KEYS = {"se"}
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
    """Which modules a rule acts on; a module must satisfy every criterion given."""

    se: bool = False

    def describe(self) -> str:
        return "SE blocks" if self.se else "nothing"


@dataclass(frozen=True)
class Rule:
    action: str
    select: Selector
    eca: EcaOptions = field(default_factory=EcaOptions)
    optional: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` says where it came from, for messages."""

    rules: tuple[Rule, ...]
    version: int = RECIPE_VERSION
    name: str | None = None
    description: str | None = None
    source: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, complete with defaults: what checkpoints record."""
        data = asdict(self)
        data.pop("source")
        data["rules"] = [asdict(r) for r in self.rules]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class _Lines:
    """Maps a field path such as ('rules', 0, 'eca') to its 1-based line in the YAML text."""

    def __init__(self, node: yaml.Node | None):
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*path, key.value)] = key.start_mark.line + 1
                self._walk(value, (*path, key.value))
                self.lines[(*path, key.value)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, i))

    def line(self, path: tuple) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


class _Validator:
    """Turns plain YAML data into a Recipe, raising RecipeError that names field and line."""

    def __init__(self, source: str, lines: _Lines):
        self.source = source
        self.lines = lines

    def fail(self, path: tuple, problem: str) -> RecipeError:
        where = self.source
        line = self.lines.line(path)
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
        if version != RECIPE_VERSION or isinstance(version, bool):
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
        if "select" not in data:
            raise self.fail(path, "missing required key 'select' (which modules the rule acts on).")
        return Rule(
            action=action,
            select=self.selector(data["select"], (*path, "select")),
            eca=self.eca(data.get("eca") or {}, (*path, "eca")),
            optional=self.boolean(data.get("optional", False), (*path, "optional")),
        )

    def selector(self, data: Any, path: tuple) -> Selector:
        data = self.mapping(data, path, _SELECT_KEYS)
        se = self.boolean(data.get("se", False), (*path, "se"))
        if not se:
            raise self.fail(path, "selects nothing; say which modules to act on, e.g. 'se: true'.")
        return Selector(se=se)

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


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML text."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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
    return _Validator(source, _Lines(node)).recipe(data)


def recipe_from_dict(data: dict[str, Any], source: str = "<checkpoint metadata>") -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` output (as stored in checkpoints)."""
    return _Validator(source, _Lines(None)).recipe(data)


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
