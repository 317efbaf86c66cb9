"""Looking at an input path without letting the OS's errors escape as tracebacks."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SurgeryError


def stat_input(path: Path, what: str, error: type[SurgeryError] = SurgeryError) -> os.stat_result | None:
    """The stat of input ``path`` (links followed), or None if it does not exist; an
    ``error`` naming ``what`` and the OS's reason if it cannot be looked at (a name too
    long, a folder on the way that cannot be searched, a link loop...)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        return None
    except OSError as exc:
        raise error(
            f"{what} {str(path)[:200]!r} cannot be read: {exc.strerror or exc} (errno {exc.errno}). "
            "Check the path."
        ) from None
