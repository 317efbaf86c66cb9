"""The one exception type the tool raises for bad input."""


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
