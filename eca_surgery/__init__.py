"""eca-surgery: replace Squeeze-and-Excitation blocks of timm models with ECA, or add ECA.

The public API is the names in ``__all__``: convert a model (``convert``), save and
reload it (``Conversion.save``, ``load_patched``), check a file (``verify``), heal it
(``heal``), measure it against its original (``evaluate``), and the layers below
(``load_recipe``, ``make_plan``, ``apply_plan``) with
their records and errors; export a checkpoint for deployment with a parity proof
(``export_checkpoint``). The package's top level imports neither torch nor timm, so
the CLI starts fast: each name loads its module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.4.0"

# name -> the module that defines it
_LAZY = {
    # jobs
    "inspect": "surgery",
    "convert": "surgery",
    "verify": "surgery",
    "heal": "healing",
    "evaluate": "evaluation",
    "load_patched": "checkpoint",
    "open_patched": "checkpoint",
    "save_patched": "checkpoint",
    "export_checkpoint": "export",
    "export_onnx": "export",
    "export_program": "export",
    # layers: recipe -> plan -> apply
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "bundled_recipes": "recipe",
    "recipe_schema": "recipe",
    "make_plan": "plan",
    "count_params": "plan",
    "apply_plan": "apply",
    "find_se_blocks": "detect",
    "register_se": "detect",
    "find_native": "native",
    "make_eca": "eca",
    "eca_kernel_size": "eca",
    "channel_scale_r2": "init",
    # results and records
    "Inspection": "surgery",
    "Conversion": "surgery",
    "HealSettings": "healing",
    "HealResult": "healing",
    "Evaluation": "evaluation",
    "Scores": "evaluation",
    "Labels": "choices",
    "Patched": "checkpoint",
    "CheckpointRecord": "checkpoint",
    "Provenance": "checkpoint",
    "Versions": "checkpoint",
    "ExportOptions": "export",
    "ExportResult": "export",
    "FormatResult": "export",
    "ParityRow": "export",
    "Plan": "plan",
    "Edit": "edits",
    "Position": "edits",
    "Gate": "edits",
    "Recipe": "recipe",
    "Rule": "recipe",
    "Selector": "recipe",
    "EcaOptions": "recipe",
    "SEBlock": "detect",
    "ScaleFit": "init",
    "Init": "choices",
    "Train": "choices",
    "Sort": "choices",
    # errors
    "SurgeryError": "errors",
    "RecipeError": "errors",
    "CheckpointError": "errors",
    "StoppedBySignal": "errors",
    "ExportError": "export",
    "ParityError": "export",
}

__all__ = [
    "__version__",
    "inspect",
    "convert",
    "verify",
    "heal",
    "evaluate",
    "load_patched",
    "open_patched",
    "save_patched",
    "export_checkpoint",
    "export_onnx",
    "export_program",
    "load_recipe",
    "parse_recipe",
    "bundled_recipes",
    "recipe_schema",
    "make_plan",
    "count_params",
    "apply_plan",
    "find_se_blocks",
    "register_se",
    "find_native",
    "make_eca",
    "eca_kernel_size",
    "channel_scale_r2",
    "Inspection",
    "Conversion",
    "HealSettings",
    "HealResult",
    "Evaluation",
    "Scores",
    "Labels",
    "Patched",
    "CheckpointRecord",
    "Provenance",
    "Versions",
    "ExportOptions",
    "ExportResult",
    "FormatResult",
    "ParityRow",
    "Plan",
    "Edit",
    "Position",
    "Gate",
    "Recipe",
    "Rule",
    "Selector",
    "EcaOptions",
    "SEBlock",
    "ScaleFit",
    "Init",
    "Train",
    "Sort",
    "SurgeryError",
    "RecipeError",
    "CheckpointError",
    "StoppedBySignal",
    "ExportError",
    "ParityError",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from .apply import apply_plan
    from .checkpoint import (
        CheckpointRecord,
        Patched,
        Provenance,
        Versions,
        load_patched,
        open_patched,
        save_patched,
    )
    from .choices import Init, Labels, Sort, Train
    from .detect import SEBlock, find_se_blocks, register_se
    from .eca import eca_kernel_size, make_eca
    from .edits import Edit, Gate, Position
    from .errors import CheckpointError, RecipeError, StoppedBySignal, SurgeryError
    from .evaluation import Evaluation, Scores, evaluate
    from .export import (
        ExportError,
        ExportOptions,
        ExportResult,
        FormatResult,
        ParityError,
        ParityRow,
        export_checkpoint,
        export_onnx,
        export_program,
    )
    from .healing import HealResult, HealSettings, heal
    from .init import ScaleFit, channel_scale_r2
    from .native import find_native
    from .plan import Plan, count_params, make_plan
    from .recipe import (
        EcaOptions,
        Recipe,
        Rule,
        Selector,
        bundled_recipes,
        load_recipe,
        parse_recipe,
        recipe_schema,
    )
    from .surgery import Conversion, Inspection, convert, inspect, verify


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
