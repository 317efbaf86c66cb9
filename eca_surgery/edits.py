"""The edits a plan makes: where an ECA block goes, which gate it has, and the Edit record.

An ``Edit`` is a fact about one patched model (the module acted on, where the new
block lives, its channels, kernel size and gate, the class it replaced), so a
checkpoint stores its edits and a later version applies them as they are, without
planning the recipe again. This module imports neither torch nor timm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from .choices import choice

ECA_CLASS = "timm.layers.eca.EcaModule"
MAX_KERNEL = 1023
MAX_CHANNELS = 1 << 20
MAX_PATH = 1000


class Position(str, Enum):
    """Where an edit's ECA block acts, relative to the module at its ``path``."""

    IN_PLACE = "in-place"  # replaces the module
    SLOT = "slot"  # fills the module's empty attention slot (``None`` or ``nn.Identity``)
    AFTER = "after"  # runs on the module's output
    BEFORE = "before"  # runs on the module's input

    __str__ = str.__str__

    @property
    def inserts(self) -> bool:
        """Whether the ECA is added beside the module (after or before it) rather than in its place."""
        return self in (Position.AFTER, Position.BEFORE)


class Gate(str, Enum):
    """The gate of an ECA block: timm's sigmoid, hard sigmoid, or ``2 * sigmoid`` (identity at 0)."""

    SIGMOID = "sigmoid"
    HARD_SIGMOID = "hard_sigmoid"
    DOUBLE_SIGMOID = "double_sigmoid"

    __str__ = str.__str__


@dataclass(frozen=True)
class Edit:
    """One change to the model: a new ECA block at ``eca_path``, acting on module ``path``.

    ``position`` says how (see :class:`Position`); ``old_class`` is the qualified class
    of the module at ``path`` (``"None"`` for an attention slot holding ``None``).
    ``params_before`` counts the parameters the edit removes, ``params_after`` those it
    adds; ``rule`` is the index of the recipe rule that made it.
    """

    path: str
    action: str
    position: Position
    eca_path: str
    old_class: str
    new_class: str
    channels: int
    kernel_size: int
    gate: Gate
    params_before: int
    params_after: int
    rule: int

    def __post_init__(self) -> None:
        # str enums, so a caller may write "after" or "sigmoid": the edit holds the members
        object.__setattr__(self, "position", choice(Position, self.position, "position", ValueError))
        object.__setattr__(self, "gate", choice(Gate, self.gate, "gate", ValueError))

    def to_dict(self) -> dict[str, Any]:
        """The edit as plain JSON data (enums as their values)."""
        data = asdict(self)
        data["position"], data["gate"] = self.position.value, self.gate.value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Edit:
        """An edit from :meth:`to_dict` data that may come from an untrusted file; ValueError
        naming the first field that is missing, of the wrong type or out of range."""
        if not isinstance(data, dict):
            raise ValueError(f"an edit must be an object, not {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"an edit lacks {missing[0]!r}")
        extra = sorted(str(k)[:40] for k in data if k not in names)
        if extra:
            raise ValueError(f"an edit has the unknown field {extra[0]!r}")
        for name in ("path", "action", "eca_path", "old_class", "new_class"):
            value = data[name]
            if not isinstance(value, str) or len(value) > MAX_PATH or not value.isprintable():
                raise ValueError(
                    f"edit field {name!r} must be a printable string of at most {MAX_PATH} characters"
                )
        for name, low, high in (
            ("channels", 1, MAX_CHANNELS),
            ("kernel_size", 1, MAX_KERNEL),
            ("params_before", 0, 1 << 40),
            ("params_after", 0, MAX_KERNEL),
            ("rule", 0, 1 << 16),
        ):
            value = data[name]
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"edit field {name!r} must be an integer from {low} to {high}")
        edit = cls(**{n: data[n] for n in names})  # position and gate checked as it is made
        edit.check()
        return edit

    def check(self) -> None:
        """ValueError unless the fields agree: an odd kernel no wider than the channels, an ECA
        block of the class this tool puts in, a path that makes sense for the position."""
        if self.kernel_size % 2 == 0 or self.kernel_size > self.channels:
            raise ValueError(
                f"edit at {self.eca_path!r}: kernel size {self.kernel_size} must be odd and at most "
                f"the channel count {self.channels}"
            )
        if self.new_class != ECA_CLASS:
            raise ValueError(f"edit at {self.eca_path!r}: new class must be {ECA_CLASS}")
        if self.action not in ("replace", "insert"):
            raise ValueError(f"edit at {self.eca_path!r}: action must be 'replace' or 'insert'")
        if not self.eca_path or any(not part for part in self.eca_path.split(".")):
            raise ValueError(f"edit eca_path {self.eca_path!r} is not a module path")
        if not self.position.inserts and self.eca_path != self.path:
            raise ValueError(f"edit at {self.path!r}: a {self.position.value} edit keeps the module's path")
