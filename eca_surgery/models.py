"""Building source models (timm models by name, or copies of a module object) and loading
source weights into them."""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import numbers
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, SurgeryError, sample_keys, summary

TIMM, TORCHVISION = "timm", "torchvision"
LIBRARIES = (TIMM, TORCHVISION)
# the input side of checks and MACs for torchvision's detection and segmentation models, which
# take any size (their builders name none); classification models take 3x224x224
DENSE_INPUT_SIZE = (3, 320, 320)
DENSE_PACKAGES = ("torchvision.models.detection", "torchvision.models.segmentation")


@dataclass(frozen=True)
class ModelName:
    """A model name resolved to its library: ``timm`` (a bare name or ``timm:NAME``) or
    ``torchvision`` (``torchvision:NAME``, one of ``torchvision.models.list_models()``)."""

    library: str
    arch: str

    @property
    def full(self) -> str:
        """The name as eca-surgery reports and records it: bare for timm (as before), else
        ``torchvision:NAME``."""
        return self.arch if self.library == TIMM else f"{self.library}:{self.arch}"


def resolve_name(name: str) -> ModelName:
    """The library and architecture ``name`` names; a SurgeryError (with close matches) for an
    unknown torchvision builder or source. timm names are checked when built (by timm)."""
    if not isinstance(name, str):
        raise TypeError(f"model must be a timm or torchvision model name, not {type(name).__name__}")
    library, sep, arch = name.partition(":")
    if not sep:
        library, arch = TIMM, name
    if library not in LIBRARIES or ":" in arch or not arch:
        raise SurgeryError(
            f"Unknown model {name[:80]!r}: name a timm model (e.g. seresnet50, or timm:seresnet50) or a "
            "torchvision builder (e.g. torchvision:mobilenet_v3_large)."
        )
    if library == TORCHVISION and arch not in torchvision_names():
        close = difflib.get_close_matches(arch, torchvision_names(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(TORCHVISION + ':' + c for c in close)}?" if close else ""
        raise SurgeryError(
            f"Unknown model {name[:80]!r}: torchvision has no such builder.{hint} "
            '`python -c "import torchvision; print(torchvision.models.list_models())"` lists the names.'
        )
    return ModelName(library, arch)


def torchvision_names() -> list[str]:
    """Every builder in torchvision's model registry."""
    import torchvision

    return list(torchvision.models.list_models())


def create_model(name: str, *, meta: bool = False, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (timm, or ``torchvision:NAME``) with random weights: timm's
    ``pretrained=False``, torchvision's ``weights=None``; nothing is ever downloaded.

    With ``meta=True`` nothing is allocated or initialised: parameters live on the
    meta device, which is enough for planning and for loading weights by assignment.
    """
    resolved = resolve_name(name)
    if resolved.library == TORCHVISION:
        return _create_torchvision(resolved.arch, meta, kwargs)
    return _create_timm(resolved.arch, meta, kwargs)


def _create_timm(name: str, meta: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SurgeryError(
            f"Unknown model {name!r}: timm has no such architecture.{hint} "
            "`python -c \"import timm; print(timm.list_models('*se*'))\"` lists the names."
        )
    try:
        if meta:
            with torch.device("meta"), _SkipMetaInit():
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises any type for kwargs a model cannot take
        raise SurgeryError(
            f"timm could not build {name!r} with {kwargs}: {summary(exc, 300)}.{_feature_hint(name, kwargs)}"
        ) from None


def _create_torchvision(arch: str, meta: bool, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's builder ``arch`` with ``weights=None`` (and ``weights_backbone=None``
    where it takes one) and ``kwargs``; on the meta device with ``meta``."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(arch)
    args: dict[str, Any] = {**kwargs, "weights": None}  # never downloads, whatever kwargs say
    if "weights_backbone" in inspect.signature(builder).parameters:
        args["weights_backbone"] = None
    try:
        if meta:
            with torch.device("meta"), _SkipMetaInit(), _block_params_off_meta():
                return builder(**args)
        return builder(**args)
    except Exception as exc:  # noqa: BLE001 - builders raise any type for kwargs a model cannot take
        raise SurgeryError(
            f"torchvision could not build {arch!r} with {kwargs}: {summary(exc, 300)}. Pass only the "
            "model kwargs this builder takes."
        ) from None


@contextmanager
def _block_params_off_meta() -> Iterator[None]:
    """While building on the meta device, compute RegNet's ``BlockParams`` (a handful of
    widths and depths, read back with ``.tolist()``) on the CPU: they are plain numbers, not
    weights, and cannot be read from meta tensors. Every weight stays on the meta device."""
    from torchvision.models.regnet import BlockParams

    with _LOCK:  # read the original under the lock too: another build's patch is not the original
        original = BlockParams.__dict__["from_init_params"]

        def on_cpu(cls: type, *args: Any, **kwargs: Any) -> Any:
            with torch.device("cpu"):
                return original.__func__(cls, *args, **kwargs)

        BlockParams.from_init_params = classmethod(on_cpu)
        try:
            yield
        finally:
            BlockParams.from_init_params = original


_LOCK = threading.Lock()

# the in-place ops that weight initialisation fills tensors with; on the meta device they
# compute nothing (there is no data), yet cost a Python decomposition each (half a meta build)
INIT_OPS = frozenset(
    getattr(torch.Tensor, op)
    for op in ("normal_", "uniform_", "zero_", "fill_", "erfinv_", "mul_", "add_", "clamp_")
)


class _SkipMetaInit(TorchFunctionMode):
    """While building on the meta device, skip the value-filling in-place ops of weight
    initialisation on meta tensors (they change no shape, and a meta tensor holds no values)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in INIT_OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


MODULE_PREFIX = "module:"  # a checkpoint's model built from an object: never rebuilt by name


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are empty tensors on the meta
    device: the architecture without copying (or allocating) a single weight."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class Source:
    """Where a source model comes from: a timm ``name`` built with ``kwargs``, or a module
    object (``module``), which is copied and never changed; ``name`` is then its class's
    qualified name (e.g. ``mypkg.nets.TinyNet``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None
    library: str | None = None  # timm or torchvision for a model built by name; None for an object

    @classmethod
    def of(cls, model: str | nn.Module, kwargs: dict[str, Any]) -> Source:
        """The source of ``model`` (a timm name or an ``nn.Module``); refuses model kwargs
        for an object (they are for building a model by name)."""
        from .detect import qualified_name

        if isinstance(model, nn.Module):
            if kwargs:
                raise SurgeryError(
                    f"Model kwargs ({', '.join(map(str, kwargs))}) build a model by its timm name, but a "
                    f"model object ({qualified_name(type(model))}) was passed: build it as you need it and "
                    "pass it without kwargs."
                )
            return cls(qualified_name(type(model)), {}, model)
        if not isinstance(model, str):
            raise TypeError(
                f"model must be a timm model name or a torch.nn.Module (or a torchvision:NAME), "
                f"not {type(model).__name__}"
            )
        resolved = resolve_name(model)
        kwargs = check_model_kwargs(kwargs, "model kwargs", library=resolved.library)
        return cls(resolved.full, kwargs, library=resolved.library)

    @property
    def by_name(self) -> bool:
        """Whether the model is built by its timm name (else it is a copy of an object)."""
        return self.module is None

    @property
    def record_name(self) -> str:
        """The model as a checkpoint records it: the timm name, or ``module:`` and the class."""
        return self.name if self.by_name else MODULE_PREFIX + self.name

    def build(self, meta: bool = False) -> nn.Module:
        """A fresh build: timm's random init (or a deep copy of the object); on the meta
        device with ``meta`` (nothing allocated)."""
        if self.module is None:
            return create_model(self.name, meta=meta, **self.kwargs)
        return meta_copy(self.module) if meta else copy.deepcopy(self.module)


def _feature_hint(name: str, kwargs: Mapping[str, Any]) -> str:
    """The feature maps of ``name``, for an error about ``out_indices``."""
    import timm

    if "out_indices" not in kwargs:
        return ""
    try:
        with torch.device("meta"):
            stages = [d["module"] for d in timm.create_model(name, pretrained=False).feature_info]
    except Exception:  # noqa: BLE001 - the hint is optional
        return ""
    return (
        f" {name} has {len(stages)} feature maps: "
        + ", ".join(f"{i}: {m}" for i, m in enumerate(stages))
        + "."
    )


# Model kwargs: what `model_kwargs` (the CLI's --model-arg) and a checkpoint's metadata may pass to timm.create_model.
# Only architecture and head options: nothing that names a file, a URL or a Hub repo, or
# asks for pretrained weights (pretrained, pretrained_cfg, checkpoint_path, cache_dir, ...),
# and every value typed and bounded, so a checkpoint from someone else cannot make timm
# read a path or allocate without bound.
MAX_SIDE = 4096
MAX_CHANS = 64
MAX_CLASSES = 100_000
GLOBAL_POOLS = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax",
                "fastcatavgmax", "token", "map")  # fmt: skip
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and lo <= v <= hi else f"an integer from {lo} to {hi}"

    return check


def _float_in(
    lo: float, hi: float, hi_open: bool = False, lo_open: bool = False
) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
        ok = ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        return (
            None if ok else f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        )

    return check


def _one_of(values: tuple[Any, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, str) and v in values else "one of " + ", ".join(map(repr, values))


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _list_of(item: Callable[[Any], str | None], lo: int, hi: int, what: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (list, tuple)) and lo <= len(v) <= hi and not any(item(x) for x in v)
        return None if ok else what

    return check


def _either(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        reasons = [c(v) for c in checks]
        return None if None in reasons else " or ".join(reasons)

    return check


def _short_str(v: Any) -> str | None:
    return None if isinstance(v, str) and 0 < len(v) <= 200 else "a module name (a string)"


_SIDE = _int_in(1, MAX_SIDE)
_INPUT_SIZE = _list_of(
    _int_in(1, MAX_SIDE),
    3,
    3,
    f"[channels, height, width] with channels 1 to {MAX_CHANS}, sides 1 to {MAX_SIDE}",
)
_DROP = _float_in(0.0, 1.0, hi_open=True)

OVERLAY_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "input_size": lambda v: _INPUT_SIZE(v) or (None if 1 <= v[0] <= MAX_CHANS else _INPUT_SIZE([])),
    "num_classes": _int_in(0, MAX_CLASSES),
    "mean": _list_of(_float_in(-1e3, 1e3), 1, MAX_CHANS, "a list of 1 to 64 finite numbers"),
    "std": _list_of(_float_in(0.0, 1e3, lo_open=True), 1, MAX_CHANS, "a list of 1 to 64 positive numbers"),
    "crop_pct": _float_in(0.0, 1.0, lo_open=True),
    "crop_mode": _one_of(CROP_MODES),
    "interpolation": _one_of(INTERPOLATIONS),
    "fixed_input_size": _boolean,
    "pool_size": _list_of(_SIDE, 2, 2, f"[height, width], each 1 to {MAX_SIDE}"),
    "first_conv": _short_str,
    "classifier": _either(_short_str, _list_of(_short_str, 1, 4, "a list of module names")),
}


def _overlay(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "an object of " + ", ".join(OVERLAY_CHECKS)
    return None  # its keys are checked one by one in check_model_kwargs


MODEL_KWARG_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "num_classes": _int_in(0, MAX_CLASSES),
    "in_chans": _int_in(1, MAX_CHANS),
    "global_pool": _one_of(GLOBAL_POOLS),
    "drop_rate": _DROP,
    "drop_path_rate": _DROP,
    "drop_block_rate": _DROP,
    "attn_drop_rate": _DROP,
    "proj_drop_rate": _DROP,
    "pos_drop_rate": _DROP,
    "zero_init_last": _boolean,
    "features_only": _boolean,
    "out_indices": _either(_int_in(1, 16), _list_of(_int_in(-16, 16), 1, 16, "a list of up to 16 integers")),
    "output_stride": lambda v: None if _is_int(v) and v in (8, 16, 32) else "8, 16 or 32",
    "img_size": _either(_SIDE, _list_of(_SIDE, 2, 2, f"[height, width], each 1 to {MAX_SIDE}")),
    "pretrained_cfg_overlay": _overlay,
}

# --model-arg values are JSON, and Python's spellings of its constants mean the same
PYTHON_CONSTANTS: dict[str, Any] = {"None": None, "True": True, "False": False}

# what a torchvision builder may get: head and regularisation options only; never weights (the
# builders' `weights` is always None) and backbone weights only as None
TORCHVISION_KWARG_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "num_classes": _int_in(1, MAX_CLASSES),
    "weights_backbone": lambda v: None if v is None else "null (eca-surgery never downloads weights)",
    "aux_loss": _boolean,
    "dropout": _DROP,
    "stochastic_depth_prob": _DROP,
}
KWARG_CHECKS = {TIMM: MODEL_KWARG_CHECKS, TORCHVISION: TORCHVISION_KWARG_CHECKS}


def check_seed(seed: int) -> None:
    """Refuse a seed that is not an integer torch can take (-2**63 to 2**64 - 1)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= int(seed) < 2**64:
        raise SurgeryError(f"`seed` must be an integer from -2**63 to 2**64 - 1, got {str(seed)[:40]}.")


def check_model_kwargs(
    kwargs: Any, where: str, error: type[SurgeryError] = SurgeryError, library: str | None = TIMM
) -> dict[str, Any]:
    """``kwargs`` if it is a JSON object of kwargs allowed for ``library``'s builders (timm's
    ``create_model`` or a torchvision builder; None: either, for a model not named yet) with
    values of the right type and range; else ``error`` naming the key and what it may be.
    ``where`` says where the kwargs come from (e.g. a file's metadata)."""
    if not isinstance(kwargs, dict):
        raise error(
            f"{where}: the model kwargs are {type(kwargs).__name__} {str(kwargs)[:60]!r}, not an object "
            'of keyword arguments such as {"num_classes": 10}.'
        )
    for key, value in kwargs.items():
        _check_kwarg(key, value, _kwarg_checks(key, library), where, error, library or TIMM)
        if key == "pretrained_cfg_overlay":
            for k, v in value.items():
                _check_kwarg(k, v, OVERLAY_CHECKS, where, error, TIMM, "pretrained_cfg_overlay.")
    return kwargs


def _kwarg_checks(key: Any, library: str | None) -> dict[str, Callable[[Any], str | None]]:
    """The checks of ``library``'s kwargs; for no library, those of the one that knows ``key``."""
    if library is None:
        return MODEL_KWARG_CHECKS if key in MODEL_KWARG_CHECKS else TORCHVISION_KWARG_CHECKS
    return KWARG_CHECKS[library]


def _check_kwarg(
    key: Any, value: Any, checks: dict[str, Callable[[Any], str | None]], where: str,
    error: type[SurgeryError], library: str, prefix: str = "",
) -> None:  # fmt: skip
    if key not in checks:
        allowed = f"{prefix.rstrip('.')} may set only" if prefix else f"{library} gets only these kwargs"
        raise error(
            f"{where}: model kwarg {prefix}{str(key)[:60]!r} is not allowed. eca-surgery builds models "
            f"without pretrained weights or files, and {allowed}: {', '.join(checks)}."
        )
    reason = checks[key](value)
    if reason is not None:
        raise error(f"{where}: model kwarg {prefix}{key} is {json_value(value)}; it must be {reason}.")


def json_value(value: Any) -> str:
    """``value`` as short JSON, for messages."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def input_channels(model: nn.Module) -> int | None:
    """The channels ``model`` takes: the input channels of its first convolution (the one
    its pretrained config names, else the first Conv2d); None if it has none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, str):
        try:
            conv = model.get_submodule(first)
        except AttributeError:
            conv = None
        if isinstance(getattr(conv, "in_channels", None), int):
            return conv.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dtype_of(model: nn.Module) -> str:
    """The dtype of ``model``'s first floating parameter, e.g. ``float16``."""
    return str(float_dtype(model)).removeprefix("torch.")


def dense_task(model: nn.Module) -> str | None:
    """``'detection'`` or ``'segmentation'`` for a torchvision detection or segmentation model
    (its class, or a base class of a user's subclass, from those packages), else None."""
    for cls in type(model).__mro__:
        for package in DENSE_PACKAGES:
            if cls.__module__.startswith(package):
                return package.rsplit(".", 1)[1]
    return None


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's default (C, H, W) input size: H and W from its timm pretrained config
    (else 224, or :data:`DENSE_INPUT_SIZE` for torchvision's detection and segmentation
    models), C from its first convolution (the config says 3 even for a model built with
    in_chans=1)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    dense = dense_task(model) is not None
    c, h, w = tuple(cfg.get("input_size", DENSE_INPUT_SIZE if dense else (3, 224, 224)))
    return (input_channels(model) or c, h, w)


def check_fits(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], what: str, name: str) -> None:
    """Raise CheckpointError unless ``shapes`` (key -> shape) has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {tuple(shapes[k])} in the file, {expected[k]} in the model"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label}: {sample_keys(keys)}")
    raise CheckpointError(
        f"{what} does not fit {name}: {'; '.join(parts)}. Pass a checkpoint saved from "
        f"this same architecture ({name}), or name the model the checkpoint was saved from."
    )


def check_kinds(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError where a floating tensor of the model gets a non-floating one
    (or the reverse): loading by assignment would keep it, and the model could not run."""
    wrong = [
        f"{k} ({str(state_dict[k].dtype).removeprefix('torch.')})"
        for k, t in model.state_dict().items()
        if k in state_dict and t.is_floating_point() != state_dict[k].is_floating_point()
    ]
    if wrong:
        raise CheckpointError(
            f"{what} has tensors of the wrong kind (integer where the model has floating point, or the "
            f"reverse): {sample_keys(wrong)}. Pass the model's own state_dict."
        )


def check_matches(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, name: str) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly ``model``'s keys and shapes
    (``model`` described as ``name``) and tensors of the right kind (see :func:`check_kinds`)."""
    check_fits(model, shapes_of(state_dict), what, name)
    check_kinds(model, state_dict, what)


def check_has_data(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise SurgeryError where a tensor is on the meta device: it holds no data to write."""
    empty = [k for k, t in state_dict.items() if t.is_meta]
    if empty:
        raise SurgeryError(
            f"{what} has tensors on the meta device, which hold no data: {sample_keys(empty)}. Nothing "
            "was written; give the model its weights (e.g. convert it with `convert`) before saving it."
        )


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, by assignment when the model is on
    the meta device (no copy, no initialisation), by copy otherwise."""
    on_meta = any(t.is_meta for t in _tensors(model))
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    left = [n for n, t in _named_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
    return model


def has_only_persistent_state(model: nn.Module) -> bool:
    """True when the state_dict covers every tensor, so a meta build loses nothing."""
    return not any(m._non_persistent_buffers_set for m in model.modules())


def loadable(
    meta_model: nn.Module, name: str, build: Callable[[], nn.Module] | None = None, **kwargs: Any
) -> nn.Module:
    """``meta_model`` if a state_dict can fill all of it by assignment, else a real build of
    ``name`` (or ``build()``): non-persistent buffers are not in a state_dict and must be
    initialised."""
    if has_only_persistent_state(meta_model):
        return meta_model
    return build() if build is not None else create_model(name, **kwargs)


def build_with_weights(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    strict: bool = True,
    meta_model: nn.Module | None = None,
    build: Callable[[], nn.Module] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, list[str]]]:
    """Build ``name`` and load ``state_dict`` into it.

    Strict (the default): the state_dict must fit exactly (else CheckpointError), and the
    model is built on the meta device and loaded by assignment, so no weight is
    initialised only to be overwritten. Non-strict: the model is initialised, the
    tensors that fit are loaded, and the report lists what was left at initialisation
    (missing) and what was ignored (unexpected or of the wrong shape). ``meta_model``, a
    fresh meta-device build of ``name``, is used instead of building another; ``build``
    makes a real one instead of timm's ``name`` (for a model that is not built by name).
    """
    model = meta_model if meta_model is not None else create_model(name, meta=True, **kwargs)
    if not strict:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fits = {k: v for k, v in state_dict.items() if expected.get(k) == tuple(v.shape)}
        model = build() if build is not None else create_model(name, **kwargs)
        model.load_state_dict(fits, strict=False)
        report = {
            "missing": [k for k in expected if k not in fits],
            "ignored": [k for k in state_dict if k not in fits],
        }
        return model, report
    check_matches(model, state_dict, what, name)
    return load_into(loadable(model, name, build, **kwargs), state_dict), {"missing": [], "ignored": []}


def _tensors(model: nn.Module):
    return (t for _, t in _named_tensors(model))


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
