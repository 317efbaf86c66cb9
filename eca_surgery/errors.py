"""The one exception type the tool raises for bad input."""


class SurgeryError(Exception):
    """A problem with the user's input: the message names it and says how to fix it.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback.
    """


class RecipeError(SurgeryError):
    """A recipe that cannot be read, does not validate, or does not fit the model."""


class CheckpointError(SurgeryError):
    """A weights file that is missing, unreadable, or does not fit the model."""
