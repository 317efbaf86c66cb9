"""Measure a model's feature maps by running it once with forward hooks.

Runs on whatever device the model is on; on the meta device this costs no compute
and allocates nothing, so planning an insertion needs no weights. The model is run
in eval mode (no BatchNorm statistics are touched) and left as it was found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SurgeryError, summary
from .locate import backbone_path
from .models import input_size


@dataclass
class Calls:
    """What one module saw in the probe pass: its first input's and its output's shapes, per call."""

    inputs: list[tuple[int, ...] | None] = field(default_factory=list)
    outputs: list[tuple[int, ...] | None] = field(default_factory=list)


@dataclass
class ProbeResult:
    calls: dict[str, Calls]
    final: str | None
    runs_added_child: dict[str, bool] = field(default_factory=dict)


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _last_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], torch.Tensor):
        return out[-1]
    return None


def zero_image(model: nn.Module, size: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A batch of one zero image of ``size`` (default: the model's input size) on the device
    and in the floating dtype of the model's first parameter or buffer (a model may have
    neither: CPU, float32)."""
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    return torch.zeros(1, *(size or input_size(model)), device=device, dtype=dtype)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def _slot_probes(model: nn.Module, slots: list[str]) -> Iterator[None]:
    """Put an nn.Identity into each empty (None) slot for the pass, and take it out after."""
    filled = []
    for path in slots:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if getattr(parent, name) is None:
            delattr(parent, name)
            parent.add_module(name, nn.Identity())
            filled.append((parent, name))
    try:
        yield
    finally:
        for parent, name in filled:
            delattr(parent, name)
            setattr(parent, name, None)


class _Tracer(nn.Identity):
    """A stand-in child that counts whether its parent's forward calls it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


@contextmanager
def _child_probes(model: nn.Module, owners: list[str]) -> Iterator[dict[str, _Tracer]]:
    """Add a tracer child to each module in ``owners`` for the pass: a module whose forward
    runs its children generically (``for m in self.children()``) calls it."""
    tracers = {}
    for path in owners:
        tracers[path] = _Tracer()
        model.get_submodule(path).add_module("_eca_surgery_tracer", tracers[path])
    try:
        yield tracers
    finally:
        for path in owners:
            delattr(model.get_submodule(path), "_eca_surgery_tracer")


def _run(model: nn.Module, x: torch.Tensor, paths: list[str], find_final: bool):
    """One forward pass for the probe: ``forward_features`` to find the final map, only the
    backbone when every path lies in it (a detection model cannot run whole on the meta
    device), else the whole model; a SurgeryError where the model cannot run here."""
    root = backbone_path(model)
    inside = root and all(p == root or p.startswith(f"{root}.") for p in paths)
    try:
        if find_final and hasattr(model, "forward_features"):
            return model.forward_features(x)
        return model.get_submodule(root)(x) if inside else model(x)
    except Exception as exc:  # any model object reaches here: its forward may fail in any way
        where = f" Place ECA inside its backbone ({root!r}) instead." if root and not inside else ""
        raise SurgeryError(
            f"Cannot run {type(model).__name__} on a zero image of size {tuple(x.shape)} "
            f"to measure the modules a recipe selects ({summary(exc)}).{where}"
        ) from None


@torch.no_grad()
def probe(
    model: nn.Module,
    paths: list[str],
    slots: list[str] = (),
    find_final: bool = False,
    owners: list[str] = (),
) -> ProbeResult:
    """Run ``model`` once at its default input size (batch 1) and record, for each module
    in ``paths`` and each attention slot in ``slots``, the shapes it saw per call.

    With ``find_final``, also find the module that produced the final feature map (the
    output of ``forward_features``, or the last map of a features_only model): the last
    module to finish whose output is that very tensor. For each module in ``owners``,
    also tell whether its forward would run a child added to it.
    """
    if next(model.parameters(), None) is None:  # ECA weights are made like the model's own
        raise SurgeryError(
            f"{type(model).__name__} has no parameters, so there are no weights to place ECA "
            "among; pass the model that holds the layers you mean to change."
        )
    calls: dict[str, Calls] = {p: Calls() for p in [*paths, *slots]}
    finished: list[tuple[str, torch.Tensor]] = []
    handles = []
    x = zero_image(model)
    with eval_mode(model), _slot_probes(model, list(slots)), _child_probes(model, list(owners)) as tracers:
        try:
            for path in calls:

                def record(module, args, output, path=path):
                    calls[path].inputs.append(_shape(args[0]) if args else None)
                    calls[path].outputs.append(_shape(output))

                handles.append(model.get_submodule(path).register_forward_hook(record))
            if find_final:
                for path, module in model.named_modules():
                    if path:
                        handles.append(
                            module.register_forward_hook(
                                lambda m, a, out, path=path: finished.append((path, out))
                            )
                        )
            out = _run(model, x, [*calls, *owners], find_final)
        finally:
            for h in handles:
                h.remove()
    final = None
    if find_final:
        tensor = _last_tensor(out)
        final = next((p for p, o in reversed(finished) if o is tensor), None) if tensor is not None else None
    return ProbeResult(calls, final, {p: t.calls > 0 for p, t in tracers.items()})
