"""Reading JSON from untrusted text (checkpoint metadata, --model-arg values)."""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {key[:60]!r}")
    return result


def loads_strict(text: str) -> Any:
    """``json.loads`` where every failure is a ValueError: bad syntax, a duplicate key
    (the last would silently win), nesting too deep for Python's stack (RecursionError)
    and an integer of too many digits for Python to convert."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None
