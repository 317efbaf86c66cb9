"""The tool's jobs as plain functions: inspect a model, convert it, verify a checkpoint.

This is the Python API behind the CLI; it knows nothing of typer or rich. ``convert``
owns the files it writes: it checks them before any work and writes them at the end.
"""

from __future__ import annotations

import copy
import itertools
import numbers
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply_plan
from .card import ModelCard, source_license, timm_loading
from .checkpoint import model_on_meta
from .checks import SHAPE_CHANGED, MetaPass, forward_check, left_behind, meta_pass, sample_input
from .choices import DType, Init, choice
from .data import calibration_batches, image_files
from .detect import SEBlock, find_se_blocks, find_unknown_se_like
from .edits import Position
from .errors import CheckpointError, SurgeryError
from .facts import BuildFacts
from .init import (
    BlockSamples,
    fidelity,
    fittable,
    fold_fits,
    fold_sites,
    inserted,
    record_se,
    run,
    set_fitted,
    zero_kernels,
)
from .models import (
    TIMM,
    Source,
    build_with_weights,
    check_fits,
    check_seed,
    create_model,
    dense_task,
    dtype_of,
    float_dtype,
    input_size,
    meta_copy,
    resolve_name,
    shapes_of,
)
from .native import NOT_NATIVE, check_native, find_native
from .outputs import Meanwhile
from .plan import Plan, count_params, make_plan
from .recipe import Recipe, load_recipe
from .weights import pretrained_file, read_state_dict

RANDOM_SOURCE = "random init (timm, pretrained=False)"
RANDOM_TORCHVISION = "random init (torchvision, weights=None)"
OWN_WEIGHTS = "the model object's own weights"
NOT_TIMM = (
    "`timm_dir` writes a folder that plain timm builds by name, but {model} is not a timm model. Save "
    "the eca-surgery checkpoint instead (`output`, or Conversion.save): eca_surgery.load_patched(path) "
    "rebuilds it from the file alone."
)
NOT_BY_NAME = (
    "`timm_dir` writes a folder that plain timm builds by name, but {model} was passed as a model "
    "object, which timm cannot build. Save the eca-surgery checkpoint instead (`output`, or "
    "Conversion.save) and reload it with eca_surgery.load_patched(path, model=...)."
)


@dataclass
class Inspection:
    model_name: str
    se_blocks: list[SEBlock]
    params: int
    plan: Plan | None
    macs: dict[str, Any]
    unknown_se_like: list[str] = field(default_factory=list)  # 'PATH (CLASS)', see register_se


@dataclass
class Conversion:
    """A converted model and what was done: the plan, the source weights, the checks, the
    MACs, the timm-native variant (if timm builds it), what a non-strict load left out,
    how the new kernels started, and the files ``convert`` wrote (if any).

    ``original`` is set for a model converted from a module object: an unpatched copy of
    it on the meta device (no weights), which ``save`` checks the file against."""

    model: nn.Module
    plan: Plan
    model_kwargs: dict[str, Any]
    source: str
    check: dict[str, Any] | None
    macs: dict[str, Any]
    native: dict[str, Any] | None = None
    loaded: dict[str, list[str]] = field(default_factory=lambda: {"missing": [], "ignored": []})
    init: dict[str, Any] = field(default_factory=lambda: {"method": "default"})
    dry_run: bool = False
    strict: bool = True
    output: Path | None = None
    timm_dir: Path | None = None
    leftovers: list[Path] = field(default_factory=list)
    original: nn.Module | None = field(default=None, repr=False)
    # key -> shape of the model as convert built it by name with ``model_kwargs`` and patched it
    # by ``plan``: what rebuilding the saved file gives, so ``save`` need not build it again
    built: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)

    @property
    def dtype(self) -> str:
        """The floating dtype of the converted model's weights (that of the source file)."""
        return dtype_of(self.model)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the converted model as an eca-surgery checkpoint (safetensors, atomically)
        that ``load_patched`` rebuilds: with the model kwargs, source weights, timm-native
        variant and init record of this conversion. Returns the path written."""
        return self._save(path, force)

    def _save(self, path: str | Path, force: bool, meanwhile: Meanwhile | None = None) -> Path:
        """``save``, running ``meanwhile`` as the file is written (see ``save_patched``)."""
        from .checkpoint import save_patched

        self._check_weights()
        return save_patched(
            self.model,
            path,
            self.plan,
            model_kwargs=self.model_kwargs,
            source=self.source,
            native=self.native,
            init=self.init,
            force=force,
            original=self.original,
            built=self.built,
            meanwhile=meanwhile,
        )

    def save_timm_dir(self, path: str | Path, *, force: bool = False) -> Path:
        """Write a timm / Hugging Face folder (config.json + model.safetensors) that plain
        timm loads with ``create_model('local-dir:PATH', pretrained=True)``; refused when
        timm cannot build this variant itself. Returns the folder written."""
        from .native import save_timm_dir

        self._check_weights()
        if self.original is not None:
            raise SurgeryError(NOT_BY_NAME.format(model=self.plan.model))
        if self.native is None:
            raise SurgeryError(NOT_NATIVE.format(model=self.plan.model))
        return save_timm_dir(self.native, self.model.state_dict(), path, force, self.card(Path(path).name))

    def card(self, folder: str) -> ModelCard:
        """The model card of this conversion, for a folder named ``folder``."""
        from . import __version__

        return ModelCard(
            self.plan,
            self.source,
            timm_loading(folder),
            macs=self.macs,
            init=self.init,
            dtype=self.dtype,
            license=source_license(self.model, self.source),
            version=__version__,
        )

    def _check_weights(self) -> None:
        if self.dry_run:
            raise SurgeryError(
                "This conversion was a dry run (`dry_run=True`): it has a plan but no weights to save. "
                "Convert again without `dry_run` to save it."
            )


def macs_before_after(meta_model: nn.Module, plan: Plan | None, count: bool = True) -> dict[str, Any]:
    """Apply ``plan`` to ``meta_model`` (pass a model you no longer need) and, with
    ``count``, return the MACs at the default input size before and after, counted on
    the meta device. Where counting fails, ``macs_error`` says why; where only the backbone
    of a detection model could be counted, ``macs_scope`` names it (see ``flops``)."""
    before = meta_pass(meta_model, check=False, count=count)
    if plan is not None:
        apply_plan(meta_model, plan)
    after = _patched_pass(lambda: meta_model, plan, before, check=False, count=count)
    return macs_report(before, after, input_size(meta_model)) if count else {}


def _patched_pass(
    patched: Callable[[], nn.Module], plan: Plan | None, before: MetaPass, check: bool, count: bool
) -> MetaPass:
    """The patched model's output shape and MACs from the original's pass ``before``: the same
    shape (every edit puts an ECA, which keeps its input's shape, in the place of an SE block,
    which kept it too, or beside a module), and the MACs derived (see :func:`derived_macs`).
    Where the MACs cannot be derived, the patched meta-device model ``patched()`` gives runs
    once on the meta device. A plan with no edits changes nothing."""
    if plan is None or not plan.edits:
        return before
    derived = derived_macs(before, plan) if count else None
    if count and derived is None:
        return meta_pass(patched(), check=check, count=count)
    return MetaPass(before.shape if check else None, derived)


def derived_macs(before: MetaPass, plan: Plan) -> int | None:
    """The patched model's MACs from the original's pass, without running it again: the MACs of
    each module replaced in place come off, and each ECA's convolution (``channels`` x
    ``kernel_size`` MACs; pooling and gates are not counted) goes on. None where the original
    was not counted whole module by module (a detection model's backbone only)."""
    if before.macs is None or before.scope or not before.modules:
        return None
    removed = sum(before.modules.get(e.path, 0) for e in plan.edits if e.position == Position.IN_PLACE)
    if removed > before.macs:  # not a pass of this model (a cache file, say): count the patched one
        return None
    return before.macs - removed + sum(e.channels * e.kernel_size for e in plan.edits)


def macs_report(before: MetaPass, after: MetaPass, size: tuple[int, int, int]) -> dict[str, Any]:
    """The MACs entries of a report: the input size, the MACs before and after, and where
    counting failed or only counted a backbone, why and which (``macs_error``, ``macs_scope``)."""
    report: dict[str, Any] = {"input_size": list(size), "macs_before": before.macs, "macs_after": after.macs}
    if before.scope or after.scope:
        report["macs_scope"] = before.scope or after.scope
    if before.why or after.why:
        report["macs_error"] = before.why or after.why
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


def inspect(
    model: str | nn.Module, recipe: Recipe | str | Path | None = None, **model_kwargs: Any
) -> Inspection:
    """The SE blocks of a model (a timm name built with ``model_kwargs``, or an ``nn.Module``,
    which is not changed) and, with a recipe (a Recipe, a file or a bundled name), the plan
    and MACs; allocates no weights. An object's name is its class's qualified name."""
    recipe = as_recipe(recipe) if recipe is not None else None
    source = Source.of(model, model_kwargs)
    meta = _build(source, meta=True)
    plan = make_plan(meta, recipe, source.name) if recipe is not None else None
    blocks = find_se_blocks(meta)
    params = count_params(meta)
    unknown = find_unknown_se_like(meta)
    macs = macs_before_after(meta, plan)
    return Inspection(source.name, blocks, params, plan, macs, unknown)


def _build(source: Source, meta: bool = False) -> nn.Module:
    """``source.build``, with timm models built through this module's ``create_model``."""
    if source.by_name:
        return create_model(source.name, meta=meta, **source.kwargs)
    return source.build(meta)


def plan_recipe(model: str | nn.Module, recipe: Recipe | str | Path, **model_kwargs: Any) -> Plan:
    """The plan ``recipe`` gives on ``model`` (a timm name built with ``model_kwargs``, or an
    ``nn.Module``) on the meta device: no weights, nothing run but the probe pass."""
    recipe = as_recipe(recipe)
    source = Source.of(model, model_kwargs)
    return make_plan(_build(source, meta=True), recipe, source.name)


def source_weights(
    model_name: str, checkpoint: str | Path | None = None, pretrained: bool = False, by_name: bool = True
) -> tuple[Path | None, str]:
    """The file the source weights come from (None: random init, or an object's own weights
    where the model is not ``by_name``) and a description of it."""
    if checkpoint is not None and pretrained:
        raise SurgeryError("Pass either `checkpoint` (a file) or `pretrained`, not both.")
    if pretrained and not by_name:
        raise SurgeryError(
            f"`pretrained` reads timm's cached weights for a model named by timm, but {model_name} was "
            "passed as a model object: load its weights into it first, or pass them as `checkpoint`."
        )
    if pretrained:
        return pretrained_file(model_name)
    if checkpoint is not None:
        return Path(checkpoint), str(checkpoint)
    if not by_name:
        return None, OWN_WEIGHTS
    return None, RANDOM_SOURCE if resolve_name(model_name).library == TIMM else RANDOM_TORCHVISION


@dataclass(frozen=True)
class _Outputs:
    """Where ``convert`` writes: the checkpoint and/or the timm folder (None: not written)."""

    output: Path | None
    timm_dir: Path | None
    force: bool
    dtype: DType | None = None  # the converted model's dtype, cast before writing

    @classmethod
    def of(
        cls, output: str | Path | None, timm_dir: str | Path | None, force: bool, dtype: object
    ) -> _Outputs:
        """The outputs ``convert`` was given, ``dtype`` checked (a SurgeryError naming the choices)."""
        return cls(
            _path(output), _path(timm_dir), force, None if dtype is None else choice(DType, dtype, "dtype")
        )

    def check(self, size: int | None = None) -> None:
        """Refuse outputs that may not be written (see ``outputs``); ``size``: bytes needed."""
        from .native import check_timm_dir
        from .outputs import check_file_output

        if self.output is not None:
            check_file_output(self.output, self.force, size)
        if self.timm_dir is not None:
            check_timm_dir(self.timm_dir, self.force, size)

    def check_before_work(self, inputs: dict[str, str | Path | None]) -> list[Path]:
        """Check each output, remove leftovers of killed runs (returned), and refuse an
        output that is, holds or lies in one of ``inputs``."""
        from .outputs import check_outputs_apart

        self.check()
        from .outputs import clean_outputs

        removed = clean_outputs(*(p for p in (self.output, self.timm_dir) if p is not None))
        check_outputs_apart({"output": self.output, "timm folder": self.timm_dir}, inputs)
        return removed

    def write(self, result: Conversion, finish: Meanwhile) -> Conversion:
        """Run the last check (``finish``), cast the converted model to ``dtype`` (if given) and
        write the outputs; ``result``. The check runs while the checkpoint is written where it
        can (no cast in between): the file is put in place only if the check passes."""
        if self.dtype is not None or self.output is None:
            finish.run()
            finish = None
        if self.dtype is not None:
            result.model.to(getattr(torch, self.dtype.value))
            if result.check is not None:  # checked again in the dtype it is written in
                result.check = result.check | _check_in_dtype(result.model, self.dtype)
        if self.output is not None:
            result.output = result._save(self.output, self.force, meanwhile=finish)
        if self.timm_dir is not None:
            result.timm_dir = result.save_timm_dir(self.timm_dir, force=self.force)
        return result


def _check_in_dtype(model: nn.Module, dtype: DType) -> dict[str, Any]:
    """The forward check of ``model`` cast to ``dtype``; a SurgeryError if it overflows there."""
    try:
        return forward_check(model, sample_input(model, 0))
    except SurgeryError:
        raise SurgeryError(
            f"In {dtype.value} the converted model's output has NaN or infinite values (its weights or "
            "activations leave that dtype's range); nothing was written. Keep float32, or try bfloat16."
        ) from None


@dataclass
class _Job:
    """A conversion prepared before any weights are read: the checked settings, the source
    weights, the meta-device build and the plan made on it."""

    origin: Source
    init: Init
    seed: int
    strict: bool
    path: Path | None
    source: str
    calib_data: str | Path | None
    calib_size: int
    files: list[Path] | None
    meta: nn.Module
    plan: Plan
    native: dict[str, Any] | None = None
    fold: bool = True


def convert(
    model: str | nn.Module,
    recipe: Recipe | str | Path,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    strict: bool = True,
    init: Init | str = Init.DEFAULT,
    calib_data: str | Path | None = None,
    calib_size: int = 64,
    fold: bool = True,
    seed: int = 0,
    check: bool = True,
    flops: bool = True,
    timm_native: bool = True,
    dry_run: bool = False,
    output: str | Path | None = None,
    timm_dir: str | Path | None = None,
    force: bool = False,
    dtype: DType | str | None = None,
    **model_kwargs: Any,
) -> Conversion:
    """Load the source model, plan the recipe, apply it, check a forward pass, and write
    ``output`` (an eca-surgery checkpoint) and/or ``timm_dir`` (a folder plain timm loads).

    ``model``: a timm or ``torchvision:`` name (built with ``model_kwargs``) or any ``nn.Module``,
    never changed: a deep copy is patched (no kwargs, ``pretrained``, ``timm_dir``). Source
    weights: ``checkpoint`` (safetensors, or a state_dict read with ``weights_only=True``,
    assigned to a meta-device build), the cached ``pretrained`` weights, or else a random
    init; ``strict=False`` loads what fits and reports the rest. The outputs are checked
    before any work (existing ones need ``force``; none may be an input; ``timm_dir`` needs
    a plan timm builds itself) and written atomically at the end (or later, with
    ``Conversion.save``/``save_timm_dir``), cast to ``dtype`` if given.

    ``check`` runs the original on the meta device (an ECA keeps shapes, so the patched
    output's is the same) and the patched model on a small real input for finite values
    while ``output`` is written; ``flops`` counts MACs in that pass; ``timm_native`` finds timm kwargs.
    ``dry_run`` only makes the plan (and checks a checkpoint's keys). ``init``: PyTorch's init
    (``default``, seeded by ``seed``), a least-squares fit to the replaced SE blocks (``fit-se``,
    ``fold`` folding per-channel factors where exact) or, for inserted blocks, the identity
    (``identity``); the last two calibrate on ``calib_size`` inputs (``calib_data`` images or
    seeded noise) and report in ``Conversion.init`` how closely the result follows the original.
    """
    source, recipe = _source(model, model_kwargs, timm_dir), as_recipe(recipe)
    outputs = _Outputs.of(output, timm_dir, force, dtype)
    inputs = {"checkpoint": checkpoint, "recipe": recipe.source, "calibration data": calib_data}
    leftovers = outputs.check_before_work(inputs) if not dry_run else []
    job = _prepare(
        source, recipe, checkpoint, pretrained, dry_run, seed, init, strict, calib_data, calib_size, fold
    )
    _before_work(job, outputs, dry_run)
    if dry_run:
        result = _plan_only(job, flops, timm_native)
    else:
        result = outputs.write(*_convert(job, check, flops, timm_native))
    result.leftovers = leftovers
    return result


def _before_work(job: _Job, outputs: _Outputs, dry_run: bool) -> None:
    """The timm-native variant a ``timm_dir`` needs, and room for the outputs (a lower bound:
    2 bytes a parameter), checked before the weights are read."""
    if outputs.timm_dir is not None:
        job.native = check_native(job.origin.name, job.origin.kwargs, copy.deepcopy(job.meta), job.plan)
    if not dry_run:
        outputs.check(size=2 * job.plan.params_after)


def _source(model: str | nn.Module, model_kwargs: dict[str, Any], timm_dir: str | Path | None) -> Source:
    """The source of ``model``; a model object refuses ``timm_dir`` (timm cannot build it). Its
    kwargs are a copy (checked values, so plain data): a list the caller changes after ``convert``
    must not change the kwargs that the conversion records and saves."""
    source = Source.of(model, model_kwargs)
    source = replace(source, kwargs=copy.deepcopy(source.kwargs))
    if timm_dir is not None and not source.by_name:
        raise SurgeryError(NOT_BY_NAME.format(model=source.name))
    if timm_dir is not None and source.library != TIMM:
        raise SurgeryError(NOT_TIMM.format(model=source.name))
    return source


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _prepare(
    source: Source,
    recipe: Recipe,
    checkpoint: str | Path | None,
    pretrained: bool,
    dry_run: bool,
    seed: int,
    init: Init | str,
    strict: bool,
    calib_data: str | Path | None,
    calib_size: int,
    fold: bool = True,
) -> _Job:
    """Check the settings, find the source weights, build the model on the meta device
    (once) and make the plan there."""
    check_seed(seed)
    if not isinstance(fold, bool):
        raise SurgeryError(f"`fold` must be True or False, got {str(fold)[:40]!r}.")
    init = choice(Init, init, "init")
    if init is Init.DEFAULT and calib_data is not None:
        raise SurgeryError("`calib_data` is used by `init='fit-se'` and `init='identity'`; pass one of them.")
    if isinstance(calib_size, bool) or not isinstance(calib_size, numbers.Integral):
        raise SurgeryError(f"`calib_size` must be an integer, got {str(calib_size)[:40]!r}.")
    if calib_size < 1:
        raise SurgeryError(f"`calib_size` must be at least 1, got {calib_size}.")
    if init is Init.IDENTITY:
        recipe = recipe.with_insert_gate("double_sigmoid")
    files = image_files(calib_data) if calib_data is not None and not dry_run else None
    path, described = source_weights(source.name, checkpoint, pretrained, source.by_name)
    if not dry_run:
        _check_has_weights(source, path is not None and strict)
    meta = _build(source, meta=True).eval()
    plan = make_plan(meta, recipe, source.name)
    _check_init(init, meta, plan)
    job = _Job(
        source, init, seed, strict, path, described, calib_data, calib_size, files, meta, plan, fold=fold
    )
    _check_calibration_channels(job)
    return job


def _check_has_weights(source: Source, filled: bool) -> None:
    """Refuse a model object on the meta device (it holds no weights to convert) unless a
    checkpoint fills all of it (``filled``: a strict load, by assignment)."""
    if source.module is not None and not filled and model_on_meta(source.module):
        raise SurgeryError(
            f"The model object ({source.name}) has tensors on the meta device, which hold no weights to "
            "convert. Pass it built on a real device (e.g. the CPU), or give its weights with `checkpoint` "
            "(loaded strictly), or plan only with `dry_run=True`."
        )


def _check_init(init: Init, meta: nn.Module, plan: Plan) -> None:
    if init is Init.FIT_SE and not fittable(meta, plan):
        raise SurgeryError(
            "`init='fit-se'` fits each new ECA to the SE block it replaces, but this recipe replaces no "
            "SE block. Use a recipe that replaces SE blocks (e.g. se-to-eca), or `init='identity'` "
            "for inserted ECA blocks."
        )
    if init is Init.IDENTITY and not inserted(plan):
        raise SurgeryError(
            "`init='identity'` starts inserted ECA blocks as the identity, but this recipe inserts none "
            "(it only replaces). Use `init='fit-se'` to start replacing blocks from the SE they replace."
        )


def _check_calibration_channels(job: _Job) -> None:
    channels = input_size(job.meta)[0]
    if job.calib_data is not None and channels != 3:
        raise SurgeryError(
            f"Calibration images are read as RGB, but {job.origin.name} is built to take {channels} "
            "channel(s) (in_chans); calibrate on seeded noise instead (no `calib_data`)."
        )


def _plan_only(job: _Job, flops: bool, timm_native: bool) -> Conversion:
    """A dry run: a checkpoint's keys checked against the meta build, MACs counted on it."""
    if job.path is not None and job.strict:
        check_fits(
            job.meta, shapes_of(read_state_dict(job.path, shapes_only=True)), _what(job), job.origin.name
        )
    macs = macs_before_after(job.meta, job.plan, count=flops)  # leaves ``job.meta`` patched
    native = _native(job, job.meta, timm_native)
    return Conversion(
        job.meta, job.plan, job.origin.kwargs, job.source, None, macs, native, dry_run=True, strict=job.strict,
        original=_original(job),
    )  # fmt: skip


def _native(job: _Job, model: nn.Module, timm_native: bool) -> dict[str, Any] | None:
    """The timm-native variant (found already with ``timm_dir``); None for a model object or a
    model timm does not build (torchvision's)."""
    if job.native is not None or not timm_native or job.origin.library != TIMM:
        return job.native
    return find_native(job.origin.name, job.origin.kwargs, model, job.plan)


def _original(job: _Job) -> nn.Module | None:
    """For a model object, an unpatched copy of it on the meta device (see ``Conversion``)."""
    return None if job.origin.module is None else meta_copy(job.origin.module)


def _what(job: _Job) -> str:
    return f"Checkpoint {str(job.path)!r}"


def _convert(job: _Job, check: bool, flops: bool, timm_native: bool) -> tuple[Conversion, Meanwhile]:
    """Load the weights and apply the plan with the chosen init: one meta-device pass of the
    original gives its output shape and MACs, and the patched model's are derived from them.
    Also returns the last check, still to run (``finish``, see ``_Outputs.write``): the patched
    model on a small real input, for finite values."""
    job, before = _original_pass(job, check, flops)  # before any work: can it run?
    original = _original(job)
    model, loaded = _load_weights(job)
    init_report = _start_kernels(model, job)
    after, macs = None, {}
    if before is not None:
        after = _patched_pass(lambda: _patched_build(job), job.plan, before, check, flops)
        macs = macs_report(before, after, input_size(model)) if flops else {}
    native = _native(job, model, timm_native)
    result = Conversion(
        model, job.plan, job.origin.kwargs, job.source, None, macs, native, loaded, init_report,
        strict=job.strict, original=original, built=shapes_of(model.state_dict()) if job.origin.by_name else None,
    )  # fmt: skip

    stop = threading.Event()

    def finish() -> None:
        if check:
            result.check = _check(model, before.shape, after.shape, job.seed, stop)

    return result, Meanwhile(finish, stop.set)


def _patched_build(job: _Job) -> nn.Module:
    """A fresh meta-device build of the source, patched by the plan."""
    return apply_plan(_build(job.origin, meta=True).eval(), job.plan)


def _original_pass(job: _Job, check: bool, flops: bool) -> tuple[_Job, MetaPass | None]:
    """The original model's meta-device pass (None: neither ``check`` nor ``flops``): as an
    earlier run saw the same build (``facts``), else run on the build itself, whose weights come
    later, with a fresh build in ``job`` if the pass left anything behind in it (a cache of meta
    tensors). A torchvision detection or segmentation model, which caches, and a model object
    run on a copy."""
    if not (check or flops):
        return job, None
    facts = BuildFacts.of(job.origin.name, job.origin.kwargs) if job.origin.by_name else BuildFacts(None)
    before = facts.meta_pass()
    if before is not None:
        return job, before
    if dense_task(job.meta) is not None or not job.origin.by_name:
        before = meta_pass(copy.deepcopy(job.meta), check, flops)
    else:
        state = left_behind(job.meta)
        before = meta_pass(job.meta, check, flops)
        if left_behind(job.meta) != state:
            job = replace(job, meta=_build(job.origin, meta=True).eval())
    if check and flops:
        facts.remember_pass(before)
    return job, before


def _load_weights(job: _Job) -> tuple[nn.Module, dict[str, list[str]]]:
    """The original model with its source weights (on the meta build where a file gives
    them all), in eval mode; and what a non-strict load left out."""
    torch.manual_seed(job.seed)
    loaded: dict[str, list[str]] = {"missing": [], "ignored": []}
    if job.path is not None:
        state = read_state_dict(job.path)
        model, loaded = build_with_weights(
            job.origin.name, state, _what(job), strict=job.strict, meta_model=job.meta,
            build=None if job.origin.by_name else job.origin.build, **job.origin.kwargs,
        )  # fmt: skip
    else:
        model = _build(job.origin)
    return model.eval(), loaded


def _start_kernels(model: nn.Module, job: _Job) -> dict[str, Any]:
    """Apply the plan to ``model`` and start the new kernels by ``job.init``; the init record."""
    if job.init is Init.DEFAULT:
        apply_plan(model, job.plan)
        return {"method": job.init.value}
    with _in_float32(model):
        batches, described = calibration_batches(
            model, job.calib_data, job.calib_size, seed=job.seed, files=job.files, name=job.origin.name
        )
        return _initialise(model, job.plan, job.init, batches, job.fold) | {"calibration": described}


@contextmanager
def _in_float32(model: nn.Module) -> Iterator[None]:
    """Calibrate a half-precision model on the CPU in float32, where torch's float16 and bfloat16
    convolutions are many times slower; every tensor takes its own dtype back after (their values
    survive the round trip exactly), and tensors added meanwhile take the model's."""
    dtype = float_dtype(model)
    if dtype not in (torch.float16, torch.bfloat16) or next(model.parameters()).device.type != "cpu":
        yield
        return
    kept = {name: t.dtype for name, t in _floating(model)}
    model.float()
    try:
        yield
    finally:
        for name, t in _floating(model):
            t.data = t.data.to(kept.get(name, dtype))


def _floating(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s floating parameters and buffers, by name."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return [(name, t) for name, t in tensors if t.is_floating_point()]


def _check(
    model: nn.Module, expected: list, shape: list, seed: int, stop: threading.Event | None = None
) -> dict[str, Any]:
    """The forward check: the patched twin's output ``shape`` is the original's (``expected``),
    and the patched model's outputs on a small input are finite (ended early once ``stop`` is set)."""
    if shape != expected:
        raise SurgeryError(SHAPE_CHANGED.format(expected=expected))
    result = forward_check(model, sample_input(model, seed), stop)
    result["output_shape_at_default_size"] = expected
    return result


def _initialise(
    model: nn.Module, plan: Plan, init: Init, batches: list[torch.Tensor], fold: bool = True
) -> dict[str, Any]:
    """Apply ``plan`` to the loaded original ``model`` and set the new kernels by ``init``
    (for ``fit-se``, with each block's factor folded where exact, given ``fold``); the fits,
    and the fidelity with default init and with ``init``."""
    edits = fittable(model, plan) if init is Init.FIT_SE else inserted(plan)
    fitting = init is Init.FIT_SE
    sites = fold_sites(model, edits, batches) if fitting and fold else None
    samples: dict[str, BlockSamples] = {}
    problems, targets, reference = record_se(model, edits if fitting else [], batches, samples)
    apply_plan(model, plan)
    report: dict[str, Any] = {"method": init.value, "edits": [e.path for e in edits]}
    if fitting:
        report["fidelity_default"] = fidelity(reference, run(model, batches))
        fits = set_fitted(model, edits, problems, targets)
        fits = fold_fits(model, edits, fits, samples, sites, lambda m: run(m, [batches[0][:8]]))
        report["blocks"] = [f.to_dict() for f in fits]
    else:
        zero_kernels(model, edits)
    report["fidelity"] = fidelity(reference, run(model, batches))
    return report


def verify(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild a patched checkpoint from the file alone, load it strictly and run it. A file
    saved from a module object cannot be rebuilt from the file alone: it is refused."""
    from .checkpoint import ModuleNeeded, open_patched

    try:
        patched = open_patched(path)
    except ModuleNeeded as exc:
        raise CheckpointError(
            f"{str(path)!r} holds a model converted from a module object ({exc.class_name}), "
            "which verify cannot build from the file alone (nor can the CLI). Verify it through the "
            "Python API with the model object: eca_surgery.open_patched(path, model=...) with a freshly "
            "built model of that class."
        ) from None
    check = forward_check(patched.model, sample_input(patched.model, 0))
    if count_params(patched.model) != patched.record.params_recorded:
        raise SurgeryError(
            f"{str(path)!r}: the rebuilt model has {count_params(patched.model)} parameters but the file "
            f"records {patched.record.params_recorded}; it was written by a different timm or recipe."
        )
    return patched, check
