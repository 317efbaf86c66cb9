"""The tool's jobs as plain functions: inspect a model, convert it, verify a checkpoint.

This is the Python API behind the CLI; it knows nothing of typer or rich.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply_plan
from .data import calibration_batches, image_files
from .detect import SEBlock, find_se_blocks
from .errors import SurgeryError, summary
from .flops import count_macs_or_reason
from .init import INITS, fidelity, fittable, inserted, record_se, run, set_fitted, zero_kernels
from .models import (
    build_with_weights,
    check_fits,
    check_model_kwargs,
    check_seed,
    create_model,
    input_size,
    shapes_of,
)
from .native import check_native, find_native
from .plan import Plan, count_params, make_plan
from .recipe import Recipe, load_recipe
from .weights import pretrained_file, read_state_dict


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
    loaded: dict[str, list[str]] = field(default_factory=lambda: {"missing": [], "ignored": []})
    init: dict[str, Any] = field(default_factory=lambda: {"method": "default"})

    @property
    def dtype(self) -> str:
        """The floating dtype of the converted model's weights (that of the source file)."""
        return dtype_of(self.model)


def dtype_of(model: nn.Module) -> str:
    """The dtype of ``model``'s first floating parameter, e.g. ``float16``."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(dtypes[0] if dtypes else torch.float32).removeprefix("torch.")


def macs_before_after(meta_model: nn.Module, plan: Plan | None, count: bool = True) -> dict[str, Any]:
    """Apply ``plan`` to ``meta_model`` (pass a model you no longer need) and, with
    ``count``, return the MACs at the default input size before and after, counted on
    the meta device. Where counting fails, ``macs_error`` says why."""
    before, why = count_macs_or_reason(meta_model) if count else (None, None)
    if plan is not None and plan.edits:
        apply_plan(meta_model, plan)
    if not count:
        return {}
    after, why_after = count_macs_or_reason(meta_model) if plan is not None and plan.edits else (before, why)
    report = {"input_size": list(input_size(meta_model)), "macs_before": before, "macs_after": after}
    if why or why_after:
        report["macs_error"] = why or why_after
    return report


def as_recipe(recipe: Recipe | str | Path) -> Recipe:
    """``recipe`` itself, or the recipe a file path or bundled name (``"se-to-eca"``) gives."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise TypeError(
        f"recipe must be a Recipe, a recipe file or a bundled recipe's name, not {type(recipe).__name__}"
    )


def inspect(model_name: str, recipe: Recipe | str | Path | None = None, **model_kwargs: Any) -> Inspection:
    """The SE blocks of a model and, with a recipe (a Recipe, a file or a bundled name), the
    plan and MACs; allocates no weights."""
    recipe = as_recipe(recipe) if recipe is not None else None
    check_model_kwargs(model_kwargs, "model kwargs")
    model = create_model(model_name, meta=True, **model_kwargs)
    plan = make_plan(model, recipe, model_name) if recipe is not None else None
    blocks = find_se_blocks(model)
    params = count_params(model)
    return Inspection(model_name, blocks, params, plan, macs_before_after(model, plan))


def source_weights(
    model_name: str, checkpoint: str | Path | None = None, pretrained: bool = False
) -> tuple[Path | None, str]:
    """The file the source weights come from (None: random init) and a description of it."""
    if checkpoint is not None and pretrained:
        raise SurgeryError("Pass either --checkpoint FILE or --pretrained, not both.")
    if pretrained:
        return pretrained_file(model_name)
    if checkpoint is not None:
        return Path(checkpoint), str(checkpoint)
    return None, "random init (timm, pretrained=False)"


def convert(
    model_name: str,
    recipe: Recipe | str | Path,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    strict: bool = True,
    dry_run: bool = False,
    check: bool = True,
    flops: bool = True,
    timm_native: bool = True,
    seed: int = 0,
    init: str = "default",
    calib_data: str | Path | None = None,
    calib_size: int = 64,
    require_native: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    **model_kwargs: Any,
) -> Conversion:
    """Load the source model, plan the recipe, apply it and check a forward pass.

    Source weights come from ``checkpoint`` (safetensors, or a PyTorch state_dict read
    with ``weights_only=True``), from timm's pretrained weights in the Hugging Face
    cache (``pretrained``), or else from timm's random initialisation. With a file, the
    model is built on the meta device and the weights assigned (nothing is initialised
    twice); ``strict=False`` instead loads what fits and reports the rest.

    The plan is made on the meta-device build that the weights are then assigned to.
    ``check`` compares the output shape at the default input size on a meta-device twin
    (before and after the plan) and runs the patched model on a small real input for
    finite values; ``flops`` counts MACs on that twin; ``timm_native`` looks for timm
    kwargs that build the patched model. With ``dry_run`` only the plan is made (and a
    checkpoint's keys checked); nothing is built or run.

    ``init`` starts the new ECA kernels from PyTorch's default initialisation
    (``default``, seeded by ``seed``), from a least-squares fit to the SE blocks they
    replace (``fit-se``), or, for inserted blocks, as the identity (``identity``, which
    gives them the ``double_sigmoid`` gate); see ``eca_surgery.init``. Both run the
    model on ``calib_size`` calibration inputs, images from ``calib_data`` or seeded
    noise, and report in ``Conversion.init`` how closely the patched model follows
    the original there.

    Before any weights are loaded: with ``require_native``, a plan that timm cannot
    build itself (see ``native.check_native``) is refused with the reason; ``on_plan``,
    if given, is called with the plan and may raise to stop (e.g. an output check).
    """
    check_model_kwargs(model_kwargs, "model kwargs")
    recipe = as_recipe(recipe)
    check_seed(seed)
    if init not in INITS:
        raise SurgeryError(f"Unknown --init {init!r}; choose one of: {', '.join(INITS)}.")
    if init == "default" and calib_data is not None:
        raise SurgeryError("--calib-data is used by --init fit-se and --init identity; pass one of them.")
    if calib_size < 1:
        raise SurgeryError(f"--calib-size must be at least 1, got {calib_size}.")
    if init == "identity":
        recipe = recipe.with_insert_gate("double_sigmoid")
    files = image_files(calib_data) if calib_data is not None and not dry_run else None
    path, source = source_weights(model_name, checkpoint, pretrained)
    what = f"Checkpoint {str(path)!r}"
    meta = create_model(model_name, meta=True, **model_kwargs).eval()
    plan = make_plan(meta, recipe, model_name)
    _check_init(init, meta, plan)
    native = None
    if require_native:
        native = check_native(
            model_name, model_kwargs, create_model(model_name, meta=True, **model_kwargs), plan
        )
    if on_plan is not None:
        on_plan(plan)
    if calib_data is not None and input_size(meta)[0] != 3:
        raise SurgeryError(
            f"Calibration images are read as RGB, but {model_name} is built to take {input_size(meta)[0]} "
            "channel(s) (in_chans); calibrate on seeded noise instead (no --calib-data)."
        )
    if dry_run:
        if path is not None and strict:
            check_fits(meta, shapes_of(read_state_dict(path)), what, model_name)
        macs = macs_before_after(meta, plan, count=flops)
        if timm_native and native is None:
            native = find_native(model_name, model_kwargs, meta, plan)
        return Conversion(meta, plan, model_kwargs, source, None, macs, native)

    expected = _meta_output_shape(meta) if check else None  # before any work: can the model run at all?
    twin = create_model(model_name, meta=True, **model_kwargs).eval() if check or flops else None
    torch.manual_seed(seed)
    loaded = {"missing": [], "ignored": []}
    if path is not None:
        state = read_state_dict(path)
        model, loaded = build_with_weights(
            model_name, state, what, strict=strict, meta_model=meta, **model_kwargs
        )
    else:
        model = create_model(model_name, **model_kwargs)
    model.eval()
    init_report = {"method": init}
    if init == "default":
        apply_plan(model, plan)
    else:
        batches, described = calibration_batches(model, calib_data, calib_size, seed=seed, files=files)
        init_report = _initialise(model, plan, init, batches) | {"calibration": described}
    result, macs = None, {}
    if twin is not None:
        macs = macs_before_after(twin, plan, count=flops)  # leaves ``twin`` patched
        if check and _meta_output_shape(twin) != expected:
            raise SurgeryError(
                f"The patched model's output shape differs from the original's {expected}; the recipe "
                "changed the model's function beyond channel attention. Report this with the recipe."
            )
        if check:
            result = forward_check(model, _sample_input(model, seed))
            result["output_shape_at_default_size"] = expected
    if timm_native and native is None:  # found already when ``require_native``
        native = find_native(model_name, model_kwargs, model, plan)
    return Conversion(model, plan, model_kwargs, source, result, macs, native, loaded, init_report)


def _check_init(init: str, meta: nn.Module, plan: Plan) -> None:
    if init == "fit-se" and not fittable(meta, plan):
        raise SurgeryError(
            "--init fit-se fits each new ECA to the SE block it replaces, but this recipe replaces no "
            "SE block. Use a recipe that replaces SE blocks (e.g. -r se-to-eca), or --init identity "
            "for inserted ECA blocks."
        )
    if init == "identity" and not inserted(plan):
        raise SurgeryError(
            "--init identity starts inserted ECA blocks as the identity, but this recipe inserts none "
            "(it only replaces). Use --init fit-se to start replacing blocks from the SE they replace."
        )


def _initialise(model: nn.Module, plan: Plan, init: str, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Apply ``plan`` to the loaded original ``model`` and set the new kernels by ``init``;
    the fits, and the fidelity with default init and with ``init``."""
    edits = fittable(model, plan) if init == "fit-se" else inserted(plan)
    problems, targets, reference = record_se(model, edits if init == "fit-se" else [], batches)
    apply_plan(model, plan)
    report: dict[str, Any] = {"method": init, "edits": [e.path for e in edits]}
    if init == "fit-se":
        report["fidelity_default"] = fidelity(reference, run(model, batches))
        report["blocks"] = [f.to_dict() for f in set_fitted(model, edits, problems, targets)]
    else:
        zero_kernels(model, edits)
    report["fidelity"] = fidelity(reference, run(model, batches))
    return report


def _meta_output_shape(meta: nn.Module) -> list:
    x = torch.empty(1, *input_size(meta), device="meta")
    with torch.no_grad():
        return _shape_of(_run(meta, x))


def _run(model: nn.Module, x: torch.Tensor):
    """``model(x)``; a SurgeryError if the model cannot run on ``x`` (e.g. kwargs it was built
    with that its forward pass cannot take, such as global_pool '' with a classifier)."""
    try:
        return model(x)
    except Exception as exc:  # noqa: BLE001 - any error here means the model as built cannot run
        reason = summary(exc, 300)
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise SurgeryError(
            f"The model {name} cannot run on a {'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')} "
            f"input ({reason}). Check the model kwargs it was built with (e.g. global_pool, num_classes, "
            "in_chans, input_size); global_pool '' (no pooling) needs num_classes=0 on most CNNs."
        ) from None


def _sample_input(model: nn.Module, seed: int) -> torch.Tensor:
    """A small input (side at most 64, or the default size for fixed-size models)."""
    ref = next(model.parameters())
    c, h, w = input_size(model)
    if not (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size", False):
        h, w = min(h, 64), min(w, 64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, h, w, generator=gen).to(ref.device, ref.dtype)


def _outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output: one for a classifier, one per map for features_only."""
    if isinstance(out, dict):
        out = list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _shape_of(out) -> list:
    shapes = [list(t.shape) for t in _outputs(out)]
    return shapes[0] if isinstance(out, torch.Tensor) else shapes


@torch.no_grad()
def forward_check(model: nn.Module, x: torch.Tensor, expected: list | None = None) -> dict[str, Any]:
    """Run ``model`` on ``x``; raise unless the output has the expected shape(s) and is finite.

    ``output_shape`` in the result is one shape, or a list of shapes for a model that
    returns several feature maps.
    """
    out = _run(model, x)
    shape = _shape_of(out)
    finite = all(bool(torch.isfinite(t).all()) for t in _outputs(out))
    if expected is not None and shape != expected:
        raise SurgeryError(
            f"The patched model's output shape {shape} differs from the original's {expected}; "
            "the recipe changed the model's function beyond channel attention. Report this with the recipe."
        )
    if not finite:
        raise SurgeryError("The patched model's output has NaN or infinite values; check the source weights.")
    return {
        "input_shape": list(x.shape),
        "output_shape": shape,
        "finite": finite,
        "dtype": str(x.dtype).removeprefix("torch."),
    }


def verify(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild a patched checkpoint from the file alone, load it strictly and run it."""
    from .checkpoint import open_patched

    patched = open_patched(path)
    check = forward_check(patched.model, _sample_input(patched.model, 0))
    if count_params(patched.model) != patched.record.params_recorded:
        raise SurgeryError(
            f"{str(path)!r}: the rebuilt model has {count_params(patched.model)} parameters but the file "
            f"records {patched.record.params_recorded}; it was written by a different timm or recipe."
        )
    return patched, check
