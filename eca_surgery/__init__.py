"""eca-surgery: replace Squeeze-and-Excitation blocks of timm models with ECA, or add ECA.

The package's top level imports neither torch nor timm, so the CLI starts fast;
the names below load their modules on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_patched": "checkpoint",
    "save_patched": "checkpoint",
    "convert": "surgery",
    "inspect": "surgery",
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "make_plan": "plan",
    "apply_plan": "apply",
    "find_se_blocks": "detect",
    "make_eca": "eca",
    "eca_kernel_size": "eca",
    "SurgeryError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
