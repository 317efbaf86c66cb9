"""Checks that a model runs: its output shape on the meta device, and a finite forward pass
on a small real input. Used by ``convert`` (before and after the plan) and ``verify``.

``meta_pass`` runs a meta-device model once for both its output shape and its MACs, so that
``convert`` runs each of the original and the patched model once on the meta device."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import SurgeryError, summary
from .models import dense_task, float_dtype, input_size

SHAPE_CHANGED = (
    "The patched model's output shape differs from the original's {expected}; the recipe "
    "changed the model's function beyond channel attention. Report this with the recipe."
)


def meta_output_shape(meta: nn.Module) -> list:
    """The output shape(s) of ``meta`` (a meta-device model) at its default input size; for a
    torchvision detection model, of its backbone (see :func:`shape_module`)."""
    x = torch.empty(1, *input_size(meta), device="meta", dtype=float_dtype(meta))
    with torch.no_grad(), shape_only_norms(meta):
        return shape_of(run(shape_module(meta), x))


def _same_shape(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(x)


@contextmanager
def shape_only_norms(model: nn.Module) -> Iterator[None]:
    """For a pass on the meta device, let each BatchNorm (timm's norm-and-activation layers
    included) give an empty tensor of its input's shape: on meta, eval-mode batch norm runs
    torch's Python decomposition, most of a meta pass's time, only to return that shape, and
    the MAC count leaves normalisation out anyway. A model with real weights is left alone."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in m.__dict__
    ]
    if not norms or not all(t.is_meta for m in norms for t in m.parameters()):
        yield
        return
    for m in norms:
        m.forward = _same_shape
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def left_behind(model: nn.Module) -> tuple:
    """A cheap fingerprint of every module's own attributes (names, identities, container
    lengths): equal before and after a forward pass unless the pass left something behind in
    the model, such as a cache of tensors (on the meta device, useless to the real model)."""
    return tuple(
        (k, id(v), len(v) if isinstance(v, (dict, list, set)) else -1)
        for m in model.modules()
        for k, v in vars(m).items()
    )


@dataclass(frozen=True)
class MetaPass:
    """What one meta-device forward pass at the default input size saw: the output shape(s)
    (None: not checked) and the MACs (None: not counted, or could not be: ``why`` says why;
    ``scope`` names the backbone where only it was counted, see ``flops.count_macs_scoped``)."""

    shape: list | None
    macs: int | None
    why: str | None = None
    scope: str = ""
    modules: dict[str, int] = field(default_factory=dict)  # MACs per module path, where counted whole


def meta_pass(meta: nn.Module, check: bool = True, count: bool = True) -> MetaPass:
    """The output shape (``check``; a SurgeryError if ``meta`` cannot run) and the MACs
    (``count``) of ``meta``, a meta-device model, at its default input size: from one forward
    pass where the shape and the MACs are those of the same module (else, for a torchvision
    detection model, one pass for each)."""
    from .flops import count_macs_scoped
    from .probe import eval_mode

    if not count:
        return MetaPass(meta_output_shape(meta) if check else None, None)
    if shape_module(meta) is not meta:
        return MetaPass(meta_output_shape(meta) if check else None, *count_macs_scoped(meta))
    x = torch.empty(1, *input_size(meta), device="meta", dtype=float_dtype(meta))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), eval_mode(meta), shape_only_norms(meta), counter:
            out = run(meta, x)
    except SurgeryError:  # the separate passes say which failed: running, or counting only
        return MetaPass(meta_output_shape(meta) if check else None, *count_macs_scoped(meta))
    shape = shape_of(out) if check else None
    return MetaPass(shape, counter.get_total_flops() // 2, modules=module_macs(counter, meta))


def module_macs(counter: FlopCounterMode, model: nn.Module) -> dict[str, int]:
    """The MACs each module of ``model`` ran in ``counter``'s pass (children included), by path;
    torch names them after the root's class (``ResNet.layer1.0.se``)."""
    prefix = f"{type(model).__name__}."
    return {
        name.removeprefix(prefix): sum(ops.values()) // 2
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(prefix)
    }


def shape_module(model: nn.Module) -> nn.Module:
    """The part of ``model`` whose output shapes are compared on the meta device: a torchvision
    detection model's backbone (how many boxes the whole model returns depends on the data, which
    meta tensors do not hold; the SE blocks live in the backbone), else the model itself."""
    if dense_task(model) == "detection" and isinstance(model.backbone, nn.Module):
        return model.backbone
    return model


def run(model: nn.Module, x: torch.Tensor):
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


def sample_input(model: nn.Module, seed: int) -> torch.Tensor:
    """A small input (side at most 64, or the default size for fixed-size models)."""
    ref = next(model.parameters())
    c, h, w = input_size(model)
    if not (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size", False):
        h, w = min(h, 64), min(w, 64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, h, w, generator=gen).to(ref.device, ref.dtype)


def outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: one for a classifier, one per map for
    features_only or a dict of maps (segmentation), every tensor of every dict in a list
    (a detection model's boxes, labels and scores per image)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in outputs(item)]
    return [out]


class Stopped(Exception):
    """A forward check asked to stop (see ``forward_check``)."""


@contextmanager
def _stoppable(model: nn.Module, stop: threading.Event | None) -> Iterator[None]:
    """Make each module of ``model`` raise ``Stopped`` before it runs once ``stop`` is set."""
    if stop is None:
        yield
        return

    def check(module: nn.Module, args: Any) -> None:
        if stop.is_set():
            raise Stopped("the forward check was stopped")

    hooks = [m.register_forward_pre_hook(check) for m in model.modules()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def shape_of(out) -> list:
    shapes = [list(t.shape) for t in outputs(out)]
    return shapes[0] if isinstance(out, torch.Tensor) else shapes


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread meanwhile (the count is restored after): at batch 1
    and a small input each op is tiny, and a pool of threads waiting on each other costs more
    than it saves, many times more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def forward_check(model: nn.Module, x: torch.Tensor, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run ``model`` on ``x`` (a small input, on one CPU thread); raise unless every output
    is finite. Once ``stop`` is set (from another thread), the pass ends at the next module.

    ``output_shape`` in the result is one shape, or a list of shapes for a model that
    returns several feature maps.
    """
    with one_thread() if x.device.type == "cpu" else nullcontext(), _stoppable(model, stop):
        out = run(model, x)
    shape = shape_of(out)
    finite = all(bool(torch.isfinite(t).all()) for t in outputs(out))
    if not finite:
        raise SurgeryError("The patched model's output has NaN or infinite values; check the source weights.")
    return {
        "input_shape": list(x.shape),
        "output_shape": shape,
        "finite": finite,
        "dtype": str(x.dtype).removeprefix("torch."),
    }
