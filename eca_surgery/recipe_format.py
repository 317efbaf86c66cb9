"""A small declarative language for the recipe format, from which its checks and JSON Schema come.

Each object of the format (the recipe, a rule, a selector, the ECA options) is an
:class:`Obj`: a record class and a tuple of :class:`Field` specs, each naming a key,
its :class:`Kind` (a boolean, a number in a range, an odd integer, patterns, indices, a
word from a list, text, a nested object or a list of them), its default and its
description. Every kind both checks a value, raising :class:`RecipeError` that names the
field and its line, and says what it accepts as JSON Schema; so the key sets, the
validation and the schema are one description and cannot drift apart. An
:class:`Exclusion` states a rule between fields (one key's value forbids another key),
checked in code and written as an if/then in the schema.

This module imports neither torch nor timm, nor yaml.
"""

from __future__ import annotations

import math
import reprlib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import RecipeError

EXCERPT = 80

# a control character (Unicode category Cc), as Checker.printable refuses; the second
# leaves out tab and newline, which multi-line text may hold
_CONTROL = r"[\u0000-\u001f\u007f-\u009f]"
_CONTROL_IN_LINES = r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f]"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # a field without a default: left out, the record's own default applies


class Checker:
    """Where a recipe came from and the line of each field, to raise RecipeErrors naming both."""

    def __init__(self, source: str, lines: dict[tuple, int]):
        self.source = source
        self.lines = lines

    def fail(self, path: tuple, problem: str) -> RecipeError:
        where = self.source
        line = line_of(self.lines, path)
        if line is not None:
            where += f", line {line}"
        return RecipeError(f"Invalid recipe ({where}): {field_name(path) or 'the recipe'}: {problem}")

    def printable(self, value: str, path: tuple, allowed: str = "") -> None:
        """Refuse control characters (terminal escape sequences among them): recipe text
        is printed, and must not drive the user's terminal."""
        bad = next((c for c in value if c not in allowed and unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise self.fail(path, f"contains the control character {bad!r}; recipe text must be printable.")

    def items(self, value: Any, path: tuple, limit: int) -> list:
        """``value`` as a list (one item given alone is a list of one) of at most ``limit`` items."""
        values = value if isinstance(value, list) else [value]
        if len(values) > limit:
            raise self.fail(path, f"lists {len(values)} items; at most {limit} are allowed.")
        return values


class Kind:
    """What values a field takes: :meth:`check` turns one into the record's value or raises
    RecipeError; :meth:`schema` says the same as JSON Schema."""

    def check(self, ctx: Checker, value: Any, path: tuple) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Flag(Kind):
    """true or false."""

    def check(self, ctx: Checker, value: Any, path: tuple) -> bool:
        if not isinstance(value, bool):
            raise ctx.fail(path, f"expected true or false, got {describe(value)}.")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Number(Kind):
    """A finite number from ``low`` to ``high``, read as a float."""

    low: float
    high: float

    def check(self, ctx: Checker, value: Any, path: tuple) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.fail(path, f"expected a number, got {describe(value)}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ctx.fail(path, f"expected a finite number, got {describe(value)}.")
        if not self.low <= value <= self.high:  # exact, even for ints too large for a float
            raise ctx.fail(path, f"must be between {self.low:g} and {self.high:g}, got {describe(value)}.")
        return float(value)

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "minimum": self.low, "maximum": self.high}


@dataclass(frozen=True)
class OddInt(Kind):
    """An odd integer from 1 to ``high``; ``note`` ends the message (what null would mean)."""

    high: int
    note: str = ""

    def check(self, ctx: Checker, value: Any, path: tuple) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 1 <= value <= self.high
            or value % 2 == 0
        ):
            raise ctx.fail(
                path, f"expected a positive odd integer up to {self.high}{self.note}, got {describe(value)}."
            )
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": 1, "maximum": self.high, "not": {"multipleOf": 2}}


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``words``; ``noun`` names what is chosen in the message ("unknown gate 'x'")."""

    words: tuple[str, ...]
    noun: str | None = None

    def check(self, ctx: Checker, value: Any, path: tuple) -> str:
        if is_one_of(value, self.words):
            return value
        expected = ", ".join(self.words)
        if self.noun:
            raise ctx.fail(path, f"unknown {self.noun} {short_repr(value)}; expected one of: {expected}.")
        raise ctx.fail(path, f"expected one of: {expected}; got {describe(value)}.")

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.words)}


@dataclass(frozen=True)
class Version(Kind):
    """The one format version this tool reads (an int, not 1.0 or true)."""

    number: int

    def check(self, ctx: Checker, value: Any, path: tuple) -> int:
        if type(value) is not int or value != self.number:
            raise ctx.fail(
                path, f"unsupported version {short_repr(value)}; this tool reads version {self.number}."
            )
        return value

    def schema(self) -> dict[str, Any]:
        return {"const": self.number}


@dataclass(frozen=True)
class Text(Kind):
    """Printable text of at most ``limit`` characters; ``lines`` also allows tabs and newlines."""

    limit: int
    lines: bool = False

    def check(self, ctx: Checker, value: Any, path: tuple) -> str:
        if not isinstance(value, str):
            raise ctx.fail(path, f"expected a string, got {describe(value)}.")
        if len(value) > self.limit:
            raise ctx.fail(path, f"is {len(value)} characters long; at most {self.limit} are allowed.")
        ctx.printable(value, path, allowed="\t\n" if self.lines else "")
        return value

    def schema(self) -> dict[str, Any]:
        control = _CONTROL_IN_LINES if self.lines else _CONTROL
        # "not pattern" rather than "^[^...]*$": Python's re lets $ match before a final newline
        return {"type": "string", "maxLength": self.limit, "not": {"pattern": control}}


@dataclass(frozen=True)
class Patterns(Kind):
    """A non-empty string or list of at most ``items`` strings (globs, regexes, class names),
    each printable and at most ``length`` characters long; ``compile`` (ValueError naming
    the problem) checks each as a ``what``."""

    length: int
    items: int
    compile: Callable[[str], Any] | None = None
    what: str = "pattern"

    def check(self, ctx: Checker, value: Any, path: tuple) -> tuple[str, ...]:
        values = ctx.items(value, path, self.items)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ctx.fail(path, f"expected a non-empty string or list of strings, got {describe(value)}.")
        for i, v in enumerate(values):
            at = (*path, i) if isinstance(value, list) else path
            if len(v) > self.length:
                raise ctx.fail(at, f"is {len(v)} characters long; at most {self.length} are allowed.")
            ctx.printable(v, at)
        for i, v in enumerate(values if self.compile else ()):
            try:
                self.compile(v)  # type: ignore[misc]
            except ValueError as exc:
                at = (*path, i) if isinstance(value, list) else path
                raise ctx.fail(at, f"bad {self.what} {short_repr(v)}: {exc}.") from None
        return tuple(values)

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "minLength": 1, "maxLength": self.length, "not": {"pattern": _CONTROL}}
        return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": self.items}]}


@dataclass(frozen=True)
class Indices(Kind):
    """One of ``words``, an index, or a non-empty list of at most ``items`` indices, each
    from ``-bound`` to ``bound``."""

    words: tuple[str, ...]
    bound: int
    items: int

    def check(self, ctx: Checker, value: Any, path: tuple) -> str | tuple[int, ...]:
        if is_one_of(value, self.words):
            return value
        values = ctx.items(value, path, self.items)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            words = " or ".join(map(repr, self.words))
            raise ctx.fail(path, f"expected {words}, an index or a list of indices, got {describe(value)}.")
        for v in values:
            if not -self.bound <= v <= self.bound:
                raise ctx.fail(path, f"index {short_repr(v)} is out of range -{self.bound}..{self.bound}.")
        return tuple(values)

    def schema(self) -> dict[str, Any]:
        index = {"type": "integer", "minimum": -self.bound, "maximum": self.bound}
        indices = {"type": "array", "items": index, "minItems": 1, "maxItems": self.items}
        return {"oneOf": [{"enum": list(self.words)}, index, indices]}


@dataclass(frozen=True)
class ListOf(Kind):
    """A non-empty list of at most ``limit`` items of kind ``item``, read as a tuple."""

    item: Kind
    limit: int
    noun: str

    def check(self, ctx: Checker, value: Any, path: tuple) -> tuple:
        if not isinstance(value, list) or not value:
            raise ctx.fail(path, f"expected a non-empty list of {self.noun}, got {describe(value)}.")
        if len(value) > self.limit:
            raise ctx.fail(path, f"has {len(value)} {self.noun}; at most {self.limit} are allowed.")
        return tuple(self.item.check(ctx, v, (*path, i)) for i, v in enumerate(value))

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.schema(), "minItems": 1, "maxItems": self.limit}


@dataclass(frozen=True)
class Field:
    """One key of an object: its kind, the record attribute it fills (``attr``, the key by
    default), the value a missing key means (``default``; MISSING leaves the record's own
    default, "not given"), ``required`` (what the key is, for the message when it is
    missing), whether null means "not given" (``nullable``), and a description."""

    key: str
    kind: Kind
    attr: str | None = None
    default: Any = MISSING
    required: str | None = None
    nullable: bool = False
    description: str | None = None

    def check(self, ctx: Checker, value: Any, path: tuple) -> Any:
        return None if value is None and self.nullable else self.kind.check(ctx, value, path)

    def schema(self) -> dict[str, Any]:
        out = self.kind.schema()
        if self.nullable:
            out = {"oneOf": [{"type": "null"}, out]}
        if self.description:
            out["description"] = self.description
        if self.default is not MISSING:
            out["default"] = self.default
        return out


ANY: Any = _Missing()  # an Exclusion that forbids a key whatever its value


@dataclass(frozen=True)
class Exclusion:
    """If the field at ``if_path`` holds ``if_value``, the field at ``then_path`` may not be
    given (or, with ``then_value``, may not hold that value); ``message`` says why."""

    if_path: tuple[str, ...]
    if_value: Any
    then_path: tuple[str, ...]
    message: str
    then_value: Any = ANY

    def check(self, ctx: Checker, data: dict, path: tuple) -> None:
        if _lookup(data, self.if_path) != self.if_value:
            return
        found = _lookup(data, self.then_path)
        if found is not MISSING and (self.then_value is ANY or found == self.then_value):
            raise ctx.fail((*path, *self.then_path), self.message)

    def schema(self) -> dict[str, Any]:
        *parents, key = self.then_path
        if self.then_value is ANY:
            then = _nest(parents, {"not": {"required": [key]}})
        else:
            then = _nest(self.then_path, {"not": {"const": self.then_value}})
        return {"if": _nest(self.if_path, {"const": self.if_value}, required=True), "then": then}


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return MISSING
        data = data[key]
    return data


def _nest(path: list | tuple, leaf: dict[str, Any], required: bool = False) -> dict[str, Any]:
    """``leaf`` as the schema of the field at ``path`` (required all the way down if asked)."""
    for key in reversed(path):
        leaf = {"properties": {key: leaf}, **({"required": [key]} if required else {})}
    return leaf


@dataclass(frozen=True)
class Obj(Kind):
    """A mapping with the keys of ``fields`` (no others), read into ``record(**attrs)``.

    ``nonempty``, where given, is the message when no field is given (a flag given as
    false does not count); ``exclusions`` are the rules between its fields.
    """

    record: Callable[..., Any]
    fields: tuple[Field, ...]
    nonempty: str | None = None
    exclusions: tuple[Exclusion, ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(f.key for f in self.fields)

    def check(self, ctx: Checker, value: Any, path: tuple) -> Any:
        data = self.mapping(ctx, value, path)
        attrs = {}
        for f in self.fields:
            if f.key not in data and f.required:
                raise ctx.fail(path, f"missing required key {f.key!r} ({f.required}).")
            if f.key in data or f.default is not MISSING:
                attrs[f.attr or f.key] = f.check(ctx, data.get(f.key, f.default), (*path, f.key))
        if self.nonempty and all(data.get(f.key, False) is False for f in self.fields):
            raise ctx.fail(path, f"{self.nonempty}; give at least one of: {', '.join(sorted(self.keys))}.")
        for rule in self.exclusions:
            rule.check(ctx, data, path)
        return self.record(**attrs)

    def mapping(self, ctx: Checker, value: Any, path: tuple) -> dict:
        """``value`` if it is a mapping of known keys; RecipeError naming the first unknown key."""
        if not isinstance(value, dict):
            hint = " (leave the key out for the defaults)" if value is None and path else ""
            raise ctx.fail(path, f"expected a mapping, got {describe(value)}{hint}.")
        unknown = sorted(excerpt(str(k), 40) for k in value if k not in self.keys)
        if unknown:
            expected = ", ".join(sorted(self.keys))
            raise ctx.fail((*path, unknown[0]), f"unknown key {unknown[0]!r}; expected one of: {expected}.")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "additionalProperties": False}
        required = [f.key for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.nonempty:
            out["minProperties"] = 1
            out["anyOf"] = [
                {"required": [f.key], "properties": {f.key: {"const": True}}}
                if isinstance(f.kind, Flag)
                else {"required": [f.key]}
                for f in self.fields
            ]
        out["properties"] = {f.key: f.schema() for f in self.fields}
        if self.exclusions:
            out["allOf"] = [rule.schema() for rule in self.exclusions]
        return out


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of the field at ``path``, or of its nearest parent that has one."""
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def field_name(path: tuple) -> str:
    """``rules[0].select.se`` for the path ('rules', 0, 'select', 'se')."""
    out = ""
    for part in path:
        part = part if isinstance(part, int) else excerpt(str(part), 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def is_one_of(value: Any, words: tuple[str, ...]) -> bool:
    """``value in words`` for any value: a list or mapping (unhashable) is simply not one."""
    return isinstance(value, str) and value in words


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT
_REPR.maxlevel = 3


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any) -> str:
    """repr(value), bounded in length and nesting, for quoting untrusted input in messages."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a structure too deep
        text = f"<{type(value).__name__}>"
    return excerpt(text)


def describe(value: Any) -> str:
    """``type repr`` of an untrusted value, for messages ("nothing (null)" for None)."""
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {short_repr(value)}"
