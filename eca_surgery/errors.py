"""The exceptions the tool raises for bad input, and how their messages name parameters.

Library messages speak Python: a parameter is written in backticks, alone (`` `calib_size` ``)
or with a value as Python writes it (`` `init='fit-se'` ``, `` `strict=False` ``), so a
notebook user reads the names they pass. The CLI rewrites those names to its flags with
:func:`with_flags` (``--calib-size``, ``--init fit-se``, ``--non-strict``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping

_PARAM = r"`(?P<name>[a-z][a-z0-9_]*)(?:=(?P<value>[^`]*))?`"
# A string as Python's repr quotes it (how messages quote the user's text): never rewritten.
_QUOTED = r"""(?<!\w)'(?:[^'\\\n]|\\.)*'(?!\w)|(?<!\w)"(?:[^"\\\n]|\\.)*"(?!\w)"""


def with_flags(message: str, flags: Mapping[str, str], keep: Iterable[str] = ()) -> str:
    """``message`` with each parameter it names (see the module docstring) that ``flags`` knows
    rewritten as that flag: ``flags["init"] = "--init"`` turns `` `init='fit-se'` `` into
    ``--init fit-se``; a key with a value (``"strict=False"``) maps that exact use, e.g. to
    ``--non-strict``; ``=True`` of a known name is the bare flag. Other names stay as written.

    Only the message's own mentions are rewritten: backticks inside a quoted string (a path
    or name the user gave, as repr quotes it) or inside any of the texts in ``keep`` (the
    user's input, wherever a message shows it unquoted) stay as the user wrote them."""
    kept = sorted({text for text in keep if "`" in text}, key=len, reverse=True)
    pattern = "|".join([*map(re.escape, kept), _QUOTED, _PARAM])

    def rewrite(match: re.Match) -> str:
        name, value = match["name"], match["value"]
        if name is None:  # user text
            return match[0]
        if value is not None and f"{name}={value}" in flags:
            return flags[f"{name}={value}"]
        flag = flags.get(name)
        if flag is None:
            return match[0]
        if value is None or value == "True":
            return flag
        try:
            shown = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            shown = value
        return f"{flag} {shown}"

    return re.sub(pattern, rewrite, message)


def sample_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys and how many more, for messages about state_dict keys."""
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def summary(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut to ``limit``), to quote an unexpected error
    from torch or timm in a one-paragraph message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class SurgeryError(Exception):
    """A problem with the user's input: the message names it and says how to fix it.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback.
    """


class RecipeError(SurgeryError):
    """A recipe that cannot be read, does not validate, or does not fit the model."""


class CheckpointError(SurgeryError):
    """A weights file that is missing, unreadable, or does not fit the model."""


class StoppedBySignal(SurgeryError):
    """Work stopped cleanly on a signal (Ctrl-C's SIGINT, or SIGTERM); the message says what
    was kept. The CLI exits with the shell's code for that signal (130 or 143)."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name
