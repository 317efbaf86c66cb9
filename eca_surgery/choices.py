"""The choices the API's options take, as enums (how new kernels start, what heal trains,
how scan orders its rows, where evaluate reads labels, the dtype of a written file), and the bounds the CLI states in its signatures too.

They are plain ``str`` enums (``Init.FIT_SE == "fit-se"``), so a notebook user may pass
the string, and this module imports neither torch nor timm, so the CLI can use them in its
signatures and still start instantly.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

MAX_WORKERS = 256  # DataLoader worker processes heal may start
MAX_JOBS = 256  # worker processes scan may start (each a whole Python process)


class Init(str, Enum):
    """How the new ECA kernels start (see ``eca_surgery.init``)."""

    DEFAULT = "default"  # PyTorch's Conv1d initialisation, seeded
    FIT_SE = "fit-se"  # a least-squares fit to the SE block each one replaces
    IDENTITY = "identity"  # inserted blocks start as the identity (zero kernel, 2*sigmoid gate)

    __str__ = str.__str__


class Train(str, Enum):
    """What ``heal`` trains."""

    ECA = "eca"  # the new ECA kernels only
    NORM = "norm"  # those and every normalisation layer (with its running statistics)
    ALL = "all"  # every parameter

    __str__ = str.__str__


class Labels(str, Enum):
    """Where ``evaluate`` reads each image's class."""

    FOLDER = "folder"  # one subfolder per class, indexed in sorted order (torchvision's ImageFolder)
    IMAGENET = "imagenet"  # an ImageNet synset id (n01440764) in a folder or file name, as timm indexes it
    NONE = "none"  # no labels: compare the two models only

    __str__ = str.__str__


class Sort(str, Enum):
    """How ``scan`` orders its rows."""

    SAVING = "saving"
    SAVING_PCT = "saving-pct"
    PARAMS = "params"
    NAME = "name"

    __str__ = str.__str__


class ScanSource(str, Enum):
    """Which model registry ``scan`` walks."""

    TIMM = "timm"  # timm.list_models()
    TORCHVISION = "torchvision"  # torchvision.models.list_models(), named torchvision:NAME

    __str__ = str.__str__


class DType(str, Enum):
    """The floating dtype a written file stores its weights in."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    __str__ = str.__str__


def choice(enum: type[Enum], value: object, param: str, error: type[Exception] | None = None) -> Any:
    """``value`` as a member of ``enum``; else ``error`` (SurgeryError by default) naming
    ``param`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        if error is None:
            from .errors import SurgeryError as error
        names = ", ".join(str(m.value) for m in enum)  # type: ignore[attr-defined]
        raise error(f"Unknown `{param}` {str(value)[:60]!r}; choose one of: {names}.") from None
