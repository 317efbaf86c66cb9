"""The tool's jobs as plain functions: inspect a model, convert it, verify a checkpoint.

This is the Python API behind the CLI; it knows nothing of typer or rich.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply_plan
from .detect import SEBlock, find_se_blocks
from .errors import SurgeryError
from .flops import count_macs
from .models import build_with_weights, check_fits, create_model, input_size, read_safetensors, shapes_of
from .native import find_native
from .plan import Plan, make_plan
from .recipe import Recipe


@dataclass
class Inspection:
    model_name: str
    se_blocks: list[SEBlock]
    params: int
    plan: Plan | None
    macs: dict[str, Any]


@dataclass
class Conversion:
    model: nn.Module
    plan: Plan
    model_kwargs: dict[str, Any]
    source: str
    check: dict[str, Any] | None
    macs: dict[str, Any]
    native: dict[str, Any] | None = None


def macs_before_after(meta_model: nn.Module, plan: Plan | None) -> dict[str, Any]:
    """MACs at the default input size before and after ``plan``, counted on the meta
    device. Applies the plan to ``meta_model``: pass a model you no longer need."""
    size = list(input_size(meta_model))
    before = count_macs(meta_model)
    after = before
    if plan is not None and plan.edits:
        apply_plan(meta_model, plan)
        after = count_macs(meta_model)
    return {"input_size": size, "macs_before": before, "macs_after": after}


def inspect(model_name: str, recipe: Recipe | None = None, **model_kwargs: Any) -> Inspection:
    """The SE blocks of a model and, with a recipe, the plan and MACs; allocates no weights."""
    model = create_model(model_name, meta=True, **model_kwargs)
    plan = make_plan(model, recipe, model_name) if recipe is not None else None
    blocks = find_se_blocks(model)
    params = sum(p.numel() for p in model.parameters())
    return Inspection(model_name, blocks, params, plan, macs_before_after(model, plan))


def convert(
    model_name: str,
    recipe: Recipe,
    *,
    checkpoint: str | Path | None = None,
    dry_run: bool = False,
    seed: int = 0,
    **model_kwargs: Any,
) -> Conversion:
    """Load the source model, plan the recipe, apply it and check a forward pass.

    Source weights come from ``checkpoint`` (a safetensors state_dict of the source
    model) or, without one, from timm's random initialisation. With ``dry_run`` only
    the plan is made (and the checkpoint's keys checked); nothing is built or run.
    """
    what = f"Checkpoint {str(checkpoint)!r}"
    source = str(checkpoint) if checkpoint else "random init (timm, pretrained=False)"
    if dry_run:
        model = create_model(model_name, meta=True, **model_kwargs)
        if checkpoint is not None:
            check_fits(model, shapes_of(read_safetensors(checkpoint)[0]), what, model_name)
        plan = make_plan(model, recipe, model_name)
        meta = create_model(model_name, meta=True, **model_kwargs)
        macs = macs_before_after(meta, plan)  # leaves ``meta`` patched
        return Conversion(
            model, plan, model_kwargs, source, None, macs, find_native(model_name, model_kwargs, meta, plan)
        )

    torch.manual_seed(seed)
    if checkpoint is not None:
        model = build_with_weights(model_name, read_safetensors(checkpoint)[0], what, **model_kwargs)
    else:
        model = create_model(model_name, **model_kwargs)
    model.eval()
    plan = make_plan(model, recipe, model_name)
    sample = _sample_input(model, seed)
    expected = _forward_shape(model, sample)
    apply_plan(model, plan)
    check = forward_check(model, sample, expected)
    macs = macs_before_after(create_model(model_name, meta=True, **model_kwargs), plan)
    native = find_native(model_name, model_kwargs, model, plan)
    return Conversion(model, plan, model_kwargs, source, check, macs, native)


def _sample_input(model: nn.Module, seed: int) -> torch.Tensor:
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, *input_size(model), generator=gen).to(ref.device, ref.dtype)


def _outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output: one for a classifier, one per map for features_only."""
    if isinstance(out, dict):
        out = list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _shape_of(out) -> list:
    shapes = [list(t.shape) for t in _outputs(out)]
    return shapes[0] if isinstance(out, torch.Tensor) else shapes


@torch.no_grad()
def _forward_shape(model: nn.Module, x: torch.Tensor) -> list:
    return _shape_of(model(x))


@torch.no_grad()
def forward_check(model: nn.Module, x: torch.Tensor, expected: list | None = None) -> dict[str, Any]:
    """Run ``model`` on ``x``; raise unless the output has the expected shape(s) and is finite.

    ``output_shape`` in the result is one shape, or a list of shapes for a model that
    returns several feature maps.
    """
    out = model(x)
    shape = _shape_of(out)
    finite = all(bool(torch.isfinite(t).all()) for t in _outputs(out))
    if expected is not None and shape != expected:
        raise SurgeryError(
            f"The patched model's output shape {shape} differs from the original's {expected}; "
            "the recipe changed the model's function beyond channel attention. Report this with the recipe."
        )
    if not finite:
        raise SurgeryError("The patched model's output has NaN or infinite values; check the source weights.")
    return {"input_shape": list(x.shape), "output_shape": shape, "finite": finite}


def verify(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild a patched checkpoint from the file alone, load it strictly and run it."""
    from .checkpoint import open_patched

    patched = open_patched(path)
    ref = next(patched.model.parameters())
    x = torch.randn(1, *input_size(patched.model), generator=torch.Generator().manual_seed(0))
    check = forward_check(patched.model, x.to(ref.device, ref.dtype))
    if str(patched.plan.params_after) != patched.metadata.get("params_after"):
        raise SurgeryError(
            f"{str(path)!r}: the rebuilt model has {patched.plan.params_after} parameters but the file "
            f"records {patched.metadata.get('params_after')}; it was written by a different timm or recipe."
        )
    return patched, check
