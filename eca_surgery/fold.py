"""Where ``fit-se`` puts the per-channel factor an ECA cannot carry, without adding parameters.

An SE block computes ``x * S[n, c]``; its ECA replacement computes ``x * g(conv(y))``, with
no per-channel scale. ``fit-se`` (see ``eca_surgery.init``) fits a factor ``f_c`` per channel
and folds it into a module the model already has, where that is exact:

- ``norm``: the affine normalisation whose output *is* the SE block's input (ResNet's
  ``bn2``/``bn3``; a BatchNorm, GroupNorm or FrozenBatchNorm2d, or timm's BatchNormAct2d with
  no activation and no dropout after it). Its weight and bias are multiplied by ``f``, so the
  block's input becomes ``f * x`` and its output ``f * x * g(conv(f * y))`` (pooling is
  linear). An eval-mode BatchNorm is ``w * (x - mean) / std + b``: scaling ``w`` and ``b``
  scales its output exactly.
- ``conv``: the convolution that consumes the block's output (EfficientNet and MobileNetV3's
  ``conv_pwl``, RegNet's ``conv3``, torchvision's projection): its weight's input channels are
  multiplied by ``f`` (per group), so it sees ``f * x * g(conv(y))``. A convolution is linear
  in its input, so this is exact whatever comes before (EfficientNet's expansion norm is
  followed by SiLU, where a norm fold would not be).

The neighbours are found by tracing one forward pass with hooks on every module: the
producer is the last module whose output is the very tensor the SE block takes (in-place
activations return their input, so they count as producers; identities, dropouts and
containers are looked through), and it must feed the SE block alone; the consumer is the one
leaf module the SE block's output feeds. Hooks cannot see functional uses (``x + shortcut``),
so every fold is verified numerically: the folded model must compute what the unfolded one
does with the factor applied explicitly (``f`` multiplied into the ECA's input for a ``norm``
fold, into its output for a ``conv`` fold), to a relative 1e-4; a fold that breaks this is
undone bit for bit, and the block stays unfolded with that reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = ["FoldKind", "FoldSite", "Neighbours", "apply_folds", "factor_in", "find_sites"]

# modules that pass their input on unchanged in eval mode (looked through when tracing)
TRANSPARENT = {"Identity", "Dropout", "Dropout2d", "DropPath", "DropBlock2d", "StochasticDepth"}
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
TOLERANCE = 1e-4  # relative: folded vs explicit factor, in float32


class FoldKind(str, Enum):
    """Where a factor is folded: the norm before the block, or the convolution after it."""

    NORM = "norm"
    CONV = "conv"

    __str__ = str.__str__


@dataclass(frozen=True)
class FoldSite:
    """A module a block's factor folds into exactly, and the tensors that fold changes."""

    kind: FoldKind
    path: str
    tensors: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "path": self.path, "tensors": list(self.tensors)}


@dataclass(frozen=True)
class Neighbours:
    """The fold sites next to one SE block (either may be None), and why each is missing."""

    se: str
    producer: FoldSite | None
    consumer: FoldSite | None
    reasons: tuple[str, ...] = ()

    @property
    def site(self) -> FoldSite | None:
        """The preferred site: the norm before the block, else the convolution after it."""
        return self.producer or self.consumer

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class _Trace:
    """Which modules output and take each tensor object of one forward pass (by id; the
    tensors are kept alive so no id is reused)."""

    made: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    taken: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    io: dict[str, tuple[int, int]] = field(default_factory=dict)
    alive: list[Any] = field(default_factory=list)

    def take(self, path: str, args: tuple) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                self.taken[id(a)].append(path)
                self.alive.append(a)

    def make(self, path: str, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.made[id(output)].append(path)
            self.alive.append(output)
            if path in self.io and args and isinstance(args[0], torch.Tensor):
                self.io[path] = (id(args[0]), id(output))


def _transparent(module: nn.Module) -> bool:
    return type(module).__name__ in TRANSPARENT


def _looked_through(module: nn.Module) -> bool:
    """Identities, dropouts, and containers (their last child's output is theirs)."""
    if _transparent(module):
        return True
    return any(True for _ in module.children()) and not _is_norm(module)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS) or type(module).__name__ == "FrozenBatchNorm2d"


def norm_problem(module: nn.Module) -> str | None:
    """Why a factor cannot fold into ``module``'s output by scaling its weight and bias; None if it can."""
    if not _is_norm(module):
        return "not an affine normalisation"
    if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
        return "a normalisation without affine weight and bias"
    if not all(_transparent(child) for child in module.children()):
        return "a normalisation followed by an activation or dropout"
    return None


@torch.no_grad()
def trace(model: nn.Module, se_paths: list[str], run: Callable[[nn.Module], Any]) -> tuple[_Trace, dict]:
    """Run ``run(model)`` once with hooks on every module; the trace and the modules by path."""
    found = _Trace()
    found.io = dict.fromkeys(se_paths, (0, 0))
    modules = dict(model.named_modules())
    handles = []
    for path, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: found.take(p, a)))
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: found.make(p, a, o)))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return found, modules


def _producer(found: _Trace, modules: dict, se: str) -> tuple[FoldSite | None, str]:
    """The norm whose output is the block's input and feeds nothing else, or why there is none."""
    given = found.io[se][0]
    chain = [p for p in found.made.get(given, []) if not _looked_through(modules[p])]
    if not chain:
        return None, "no module's output is the block's input"
    path = chain[-1]
    problem = norm_problem(modules[path])
    if problem is not None:
        return None, f"its input comes from {path} ({type(modules[path]).__name__}), {problem}"
    inside = (f"{path}.", f"{se}.")
    others = [
        p for p in found.taken.get(given, [])
        if p != se and not p.startswith(inside) and not _transparent(modules[p])
    ]  # fmt: skip
    if others:
        return None, f"the output of {path} also feeds {others[0]}"
    return FoldSite(FoldKind.NORM, path, (f"{path}.weight", f"{path}.bias")), ""


def _consumer(found: _Trace, modules: dict, se: str) -> tuple[FoldSite | None, str]:
    """The one convolution the block's output feeds, or why there is none."""
    takers = [p for p in found.taken.get(found.io[se][1], []) if not _looked_through(modules[p])]
    if not takers:
        return None, "its output feeds no module (a functional use such as a residual sum)"
    if len(set(takers)) > 1:
        return None, f"its output feeds both {takers[0]} and {takers[1]}"
    path = takers[0]
    if not isinstance(modules[path], nn.Conv2d):
        return None, f"its output feeds {path} ({type(modules[path]).__name__}), not a convolution"
    return FoldSite(FoldKind.CONV, path, (f"{path}.weight",)), ""


def find_sites(
    model: nn.Module, se_paths: list[str], run: Callable[[nn.Module], Any]
) -> dict[str, Neighbours]:
    """Trace ``run(model)`` (the original model, SE blocks in place) and find each block's fold sites."""
    found, modules = trace(model, se_paths, run)
    sites = {}
    for se in se_paths:
        if found.io[se] == (0, 0):
            sites[se] = Neighbours(se, None, None, ("the block did not run on a tensor",))
            continue
        producer, why_not_producer = _producer(found, modules, se)
        consumer, why_not_consumer = _consumer(found, modules, se)
        reasons = () if producer or consumer else (why_not_producer, why_not_consumer)
        sites[se] = Neighbours(se, producer, consumer, reasons)
    return sites


def _conv_view(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` (out, in/groups, ...) as (groups, out/groups, in/groups, rest): input channel
    ``g * in/groups + j`` is ``[g, :, j]``."""
    out, per_group = weight.shape[:2]
    return weight.view(groups, out // groups, per_group, -1)


def scale_site(model: nn.Module, site: FoldSite, factor: torch.Tensor) -> None:
    """Multiply the tensors of ``site`` by the per-channel ``factor`` (C,), in place."""
    module = model.get_submodule(site.path)
    with torch.no_grad():
        if site.kind is FoldKind.NORM:
            for t in (module.weight, module.bias):
                t.mul_(factor.to(t.device, t.dtype))
        else:
            w = _conv_view(module.weight, module.groups)
            w.mul_(factor.to(w.device, w.dtype).view(module.groups, 1, -1, 1))


def factor_in(original: nn.Module, patched: nn.Module, site: FoldSite) -> torch.Tensor:
    """The per-channel factor folded into ``site``, read back as the least-squares ratio of the
    patched model's tensors to the original's (1 for a channel whose tensors are all zero)."""
    a, b = original.get_submodule(site.path), patched.get_submodule(site.path)
    if site.kind is FoldKind.NORM:
        old = torch.stack([a.weight.detach(), a.bias.detach()], 1).double().cpu()
        new = torch.stack([b.weight.detach(), b.bias.detach()], 1).double().cpu()
    else:
        old = _conv_view(a.weight.detach(), a.groups).double().cpu().transpose(1, 2).flatten(2).flatten(0, 1)
        new = _conv_view(b.weight.detach(), b.groups).double().cpu().transpose(1, 2).flatten(2).flatten(0, 1)
    norm = (old * old).sum(1)
    return torch.where(norm > 0, (old * new).sum(1) / norm.clamp_min(1e-300), torch.ones_like(norm))


def site_record(site: FoldSite | None, reason: str) -> dict[str, Any]:
    """The ``fold`` and ``fold_reason`` entries of a block's init record."""
    return {"fold": site.to_dict() if site else None, "fold_reason": None if site else reason}


def _explicit_hook(eca: nn.Module, site: FoldSite, factor: torch.Tensor):
    """A hook that applies ``factor`` outside the model, as the fold at ``site`` does inside it."""
    scale = factor.view(1, -1, 1, 1)
    if site.kind is FoldKind.NORM:
        return eca.register_forward_pre_hook(lambda m, a: (a[0] * scale.to(a[0]),) + tuple(a[1:]))
    return eca.register_forward_hook(lambda m, a, out: out * scale.to(out))


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by its full name (FrozenBatchNorm2d keeps its affine in buffers)."""
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path), attr)


def _close(a: Any, b: Any) -> bool:
    """Whether outputs ``a`` and ``b`` (a tensor or a list of them) agree to ``TOLERANCE``."""
    a, b = ([a], [b]) if isinstance(a, torch.Tensor) else (a, b)
    x = torch.cat([t.flatten() for t in a]).double()
    y = torch.cat([t.flatten() for t in b]).double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return False
    return float((x - y).abs().max()) <= TOLERANCE * max(float(y.abs().max()), 1e-12)


def _fold_checked(
    model: nn.Module, folds: dict[str, tuple[FoldSite, torch.Tensor]], run: Callable[[nn.Module], Any]
) -> bool:
    """Fold all ``folds`` (ECA path -> site, factor) if the result equals the explicit factors;
    else leave every tensor as it was (bit for bit). Whether it folded."""
    handles = [_explicit_hook(model.get_submodule(p), s, f) for p, (s, f) in folds.items()]
    try:
        expected = run(model)
    finally:
        for h in handles:
            h.remove()
    sites = {s.path: s for s, _ in folds.values()}
    saved = {t: _tensor(model, t).detach().clone() for s in sites.values() for t in s.tensors}
    for site, factor in folds.values():
        scale_site(model, site, factor)
    if _close(run(model), expected):
        return True
    with torch.no_grad():
        for name, value in saved.items():
            _tensor(model, name).copy_(value)
    return False


def apply_folds(
    model: nn.Module, folds: dict[str, tuple[FoldSite, torch.Tensor]], run: Callable[[nn.Module], Any]
) -> dict[str, str]:
    """Fold each factor (ECA path -> site, factor) into the patched ``model`` where it verifies
    as exact on ``run(model)``: all together, else block by block. The blocks left unfolded,
    with why."""
    if not folds or _fold_checked(model, folds, run):
        return {}
    failed = {}
    for path, fold in folds.items():
        if not _fold_checked(model, {path: fold}, run):
            failed[path] = (
                f"folding into {fold[0].path} changed the model's output beyond a relative {TOLERANCE:g} "
                "(its tensors are used elsewhere too)"
            )
    return failed
