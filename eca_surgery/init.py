"""Start new ECA blocks from what the model already computes, not from random kernels.

``fit-se``: run the original model on calibration inputs, record at each SE block that
a rule replaces the pooled channel descriptor ``y`` (N, C) and the SE's pre-gate
output ``z`` (N, C), and fit the replacing ECA's 1-D kernel ``w`` by least squares so
that ``conv1d(y, w)`` reproduces ``z``. The problem is linear in ``w`` (each output
channel is a dot product of ``w`` with ``k`` neighbouring entries of ``y``), so it is
solved in closed form from normal equations accumulated per batch in float64. Where
the ECA's gate differs from the SE's (a hard-sigmoid SE replaced by the paper's
sigmoid ECA), the target is the ECA gate's inverse of the SE's gate output instead.

With the fold (``fold=True``, the default), each block's kernel is refitted together with a
per-channel factor ``f`` that ``eca_surgery.fold`` folds into the norm before the block or the
convolution after it, where exact, so the block applies ``f_c * g(conv(y'))`` for the SE's
``S[n, c]``. The fit stays closed-form: ``f_c = mean_n S[n, c] / h``, with ``h = g(0)`` the gate
level where a sigmoid is steepest (0.5; 1 for ``double_sigmoid``); a channel the SE always
closes gets ``f_c = 0``, exact. The kernel is then fitted by the same least squares to the gate
inverse of ``h * S / mean_n S`` (the per-sample variation around each channel's mean, clamped
as above) on the descriptors the ECA will see: ``y' = f * y`` after a norm fold, ``y`` before
a convolution fold; for the latter ``f`` is refitted per channel in closed form given the gate
values (least squares, exact since ``f`` does not change them). The measure is ``scale_r2``:
the R² of the applied scales ``f_c * g`` against ``S`` over all samples and channels, with
``scale_r2_unfolded`` for the plain kernel; ``channel_scale_r2`` measures it on other inputs.

``identity``: inserted ECA blocks get a zero kernel and the ``double_sigmoid`` gate
(``2 * sigmoid``), so the patched model computes exactly the original function until
it is trained.

What runs on the calibration inputs is the whole model, except for torchvision's detection
and segmentation models, where it is their backbone (``locate.backbone_path``): the SE blocks
live there, and the full models take lists of images and end in postprocessing. Their
fidelity compares the backbone's feature maps, all of them flattened and concatenated per
sample (one cosine and one worst difference over every map).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .detect import find_adapter, find_se_blocks
from .errors import SurgeryError
from .fold import FoldKind, FoldSite, Neighbours, apply_folds, factor_in, find_sites, site_record
from .locate import backbone_path
from .plan import GATE_NAMES, Edit, Plan

INITS = ("default", "fit-se", "identity")
INSERTED = ("slot", "after", "before")
# A saturated SE gate (a hard sigmoid reaches exactly 0 or 1) has no finite sigmoid inverse;
# clamping to [0.01, 0.99] (logits within +-4.6) keeps such channels from dominating the fit.
_EPS = 1e-2


@dataclass(frozen=True)
class BlockFit:
    """How well one ECA kernel reproduces its SE block on the calibration inputs.

    ``rel_error`` is ``|Aw - z| / |z|`` and ``r2`` the share of the target's variance
    the plain kernel (no fold) explains, both over every sample and channel. With the fold,
    ``fold`` is where the block's factor went (see ``eca_surgery.fold``), or None with
    ``fold_reason``; ``scale_r2`` is the R² of the channel scales the new block applies
    (gate times factor) against the SE's, and ``scale_r2_unfolded`` that of the plain kernel.
    """

    path: str
    channels: int
    kernel_size: int
    samples: int
    rel_error: float
    r2: float
    target: str
    fold: dict[str, Any] | None = None
    fold_reason: str | None = None
    scale_r2: float | None = None
    scale_r2_unfolded: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NormalEquations:
    """Least squares for a 1-D 'same' convolution kernel, accumulated batch by batch."""

    def __init__(self, kernel_size: int) -> None:
        self.k = kernel_size
        self.gram = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
        self.rhs = torch.zeros(kernel_size, dtype=torch.float64)
        self.tt = self.t_sum = 0.0
        self.count = 0
        self.samples = 0

    def add(self, y: torch.Tensor, t: torch.Tensor) -> None:
        """Add samples: descriptors ``y`` and targets ``t``, both (N, C)."""
        y, t = y.double().cpu(), t.double().cpu().reshape(-1)
        p = (self.k - 1) // 2
        a = F.pad(y, (p, p)).unfold(1, self.k, 1).reshape(-1, self.k)  # row (n, c): y[n, c-p .. c+p]
        self.gram += a.T @ a
        self.rhs += a.T @ t
        self.tt += float(t @ t)
        self.t_sum += float(t.sum())
        self.count += t.numel()
        self.samples += y.shape[0]

    def solve(self) -> tuple[torch.Tensor, float, float]:
        """The kernel (minimum-norm if the descriptors leave it underdetermined), the
        relative residual and R^2."""
        w = torch.linalg.lstsq(self.gram, self.rhs[:, None], driver="gelsd").solution[:, 0]
        residual = max(self.tt - 2 * float(w @ self.rhs) + float(w @ self.gram @ w), 0.0)
        total = self.tt - self.t_sum**2 / max(self.count, 1)
        rel = (residual / self.tt) ** 0.5 if self.tt > 0 else 0.0
        r2 = 1 - residual / total if total > 0 else 1.0
        return w, rel, r2


def inverse_gate(gate: str, s: torch.Tensor) -> torch.Tensor:
    """The pre-gate value that makes an ECA gate ``gate`` output ``s``."""
    if gate == "hard_sigmoid":
        return 6 * s - 3
    if gate == "double_sigmoid":
        s = s / 2
    return torch.logit(s.clamp(_EPS, 1 - _EPS))


def fittable(model: nn.Module, plan: Plan) -> list[Edit]:
    """The edits of ``plan`` that replace an SE block, which ``fit-se`` can fit."""
    se = {b.path for b in find_se_blocks(model)}
    return [e for e in plan.edits if e.position == "in-place" and e.path in se]


def inserted(plan: Plan) -> list[Edit]:
    """The edits of ``plan`` that add an ECA where there was none."""
    return [e for e in plan.edits if e.position in INSERTED]


def se_gate(se: nn.Module, path: str) -> nn.Module:
    """The gate module of the SE block ``se`` at ``path``, whose input ``fit-se`` fits to."""
    adapter = find_adapter(se)
    gate = adapter.gate_module(se) if adapter is not None else None
    if gate is None:
        raise SurgeryError(
            f"`init='fit-se'` needs the gate module of the SE block at {path!r} "
            f"({type(se).__name__}), and none is known. Register its class with its gate: "
            f'eca_surgery.register_se({type(se).__name__}, channels=..., gate="<gate attribute>"), '
            "or use `init='default'`."
        )
    return gate


@dataclass
class BlockSamples:
    """One SE block's calibration samples: the pooled descriptors ``y`` of its input and the
    channel scales ``S`` its gate output, each a list of (N, C) float64 batches."""

    descriptors: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)

    def y(self) -> torch.Tensor:
        return torch.cat(self.descriptors)

    def s(self) -> torch.Tensor:
        return torch.cat(self.scales)


def _sample_hooks(model: nn.Module, paths: list[str], samples: dict[str, BlockSamples]) -> list:
    """Hooks that fill ``samples[path]`` at each SE block: its input's mean over space, and
    its gate's output (the scales the block multiplies its input by)."""
    handles = []

    def on_input(path, args):
        samples[path].descriptors.append(args[0].detach().double().mean((2, 3)).cpu())

    def on_gate(path, output):
        samples[path].scales.append(output.detach().double().flatten(1).cpu())

    for path in paths:
        se = model.get_submodule(path)
        samples[path] = BlockSamples()
        handles.append(se.register_forward_pre_hook(lambda m, a, p=path: on_input(p, a)))
        handles.append(se_gate(se, path).register_forward_hook(lambda m, a, o, p=path: on_gate(p, o)))
    return handles


@torch.no_grad()
def record_samples(
    model: nn.Module, paths: list[str], batches: list[torch.Tensor]
) -> tuple[dict[str, BlockSamples], torch.Tensor | list]:
    """Run ``model`` on ``batches``; each SE block's samples (by path), and the outputs."""
    samples: dict[str, BlockSamples] = {}
    handles = _sample_hooks(model, paths, samples)
    try:
        outputs = run(model, batches)
    finally:
        for h in handles:
            h.remove()
    return samples, outputs


@torch.no_grad()
def record_se(
    model: nn.Module,
    edits: list[Edit],
    batches: list[torch.Tensor],
    samples: dict[str, BlockSamples] | None = None,
) -> tuple[dict[str, NormalEquations], dict[str, str], torch.Tensor | list]:
    """Run the original ``model`` on ``batches``; accumulate each SE block's fit problem
    (and, given a ``samples`` dict, fill it with each block's descriptors and scales).

    Returns the normal equations and the target description per SE path, and the
    model's outputs (for fidelity).
    """
    problems: dict[str, NormalEquations] = {}
    targets: dict[str, str] = {}
    pooled: dict[str, torch.Tensor] = {}
    handles = []

    def on_input(path, module, args):
        pooled[path] = args[0].double().mean((2, 3))

    def on_gate_input(path, args):  # before the gate runs: an in-place gate overwrites its input
        problems[path].add(pooled.pop(path), args[0])

    def on_gate_output(path, gate, output):
        problems[path].add(pooled.pop(path), inverse_gate(gate, output.double()))

    for edit in edits:
        se = model.get_submodule(edit.path)
        gate_module = se_gate(se, edit.path)
        problems[edit.path] = NormalEquations(edit.kernel_size)
        same = edit.gate == GATE_NAMES.get(type(gate_module).__name__)
        targets[edit.path] = "pre-gate output" if same else f"{edit.gate} inverse of the SE gate's output"
        handles.append(se.register_forward_pre_hook(lambda m, a, p=edit.path: on_input(p, m, a)))
        if same:
            handles.append(
                gate_module.register_forward_pre_hook(lambda m, a, p=edit.path: on_gate_input(p, a))
            )
        else:
            handles.append(
                gate_module.register_forward_hook(
                    lambda m, a, o, p=edit.path, g=edit.gate: on_gate_output(p, g, o)
                )
            )
    if samples is not None:
        handles += _sample_hooks(model, [e.path for e in edits], samples)
    try:
        outputs = run(model, batches)
    finally:
        for h in handles:
            h.remove()
    return problems, targets, outputs


def set_fitted(
    model: nn.Module, edits: list[Edit], problems: dict[str, NormalEquations], targets: dict[str, str]
) -> list[BlockFit]:
    """Solve each fit and copy the kernel into the (already applied) ECA block."""
    fits = []
    for edit in edits:
        problem = problems[edit.path]
        w, rel, r2 = problem.solve()
        conv = model.get_submodule(edit.eca_path).conv
        with torch.no_grad():
            conv.weight.copy_(w.view_as(conv.weight))
        fits.append(
            BlockFit(edit.path, edit.channels, edit.kernel_size, problem.samples, rel, r2, targets[edit.path])
        )
    return fits


def zero_kernels(model: nn.Module, edits: list[Edit]) -> None:
    """Zero the kernels of ``edits``' ECA blocks (with ``double_sigmoid``: the identity)."""
    with torch.no_grad():
        for edit in edits:
            model.get_submodule(edit.eca_path).conv.weight.zero_()


@torch.no_grad()
def run(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor | list:
    """``model``'s outputs on ``batches`` (its backbone's, for a torchvision detection or
    segmentation model: see ``locate.backbone_path``), concatenated on the CPU in float32 (per
    feature map for a model that returns several)."""
    ref = next(model.parameters())
    net = model.get_submodule(backbone_path(model))
    outs = [net(x.to(ref.device, ref.dtype)) for x in batches]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat([o.float().cpu() for o in outs])
    outs = [list(o.values()) if isinstance(o, dict) else list(o) for o in outs]
    return [torch.cat([o[i].float().cpu() for o in outs]) for i in range(len(outs[0]))]


def fidelity(reference: torch.Tensor | list, outputs: torch.Tensor | list) -> dict[str, Any]:
    """How closely ``outputs`` follow ``reference``: mean per-sample cosine similarity,
    worst absolute difference and, for a classifier, top-1 agreement."""
    ref = [reference] if isinstance(reference, torch.Tensor) else reference
    out = [outputs] if isinstance(outputs, torch.Tensor) else outputs
    a = torch.cat([r.flatten(1) for r in ref], 1).double()
    b = torch.cat([o.flatten(1) for o in out], 1).double()
    result: dict[str, Any] = {
        "samples": a.shape[0],
        "cosine": float(F.cosine_similarity(a, b, dim=1).mean()),
        "max_abs_diff": float((a - b).abs().max()),
    }
    if isinstance(reference, torch.Tensor) and reference.dim() == 2:
        result["top1_agreement"] = float((reference.argmax(1) == outputs.argmax(1)).double().mean())
    return result


def gate_value(gate: str, a: torch.Tensor) -> torch.Tensor:
    """The ECA gate ``gate`` applied to pre-gate values ``a`` (the inverse of ``inverse_gate``)."""
    if gate == "hard_sigmoid":
        return ((a + 3) / 6).clamp(0, 1)
    return 2 * torch.sigmoid(a) if gate == "double_sigmoid" else torch.sigmoid(a)


def eca_scores(y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """An ECA's pre-gate values for descriptors ``y`` (N, C): the 'same' 1-D convolution, float64."""
    w = kernel.detach().double().cpu().reshape(1, 1, -1)
    return F.conv1d(y[:, None], w, padding=(w.shape[-1] - 1) // 2)[:, 0]


def scale_r2(applied: torch.Tensor, target: torch.Tensor) -> float:
    """R² of the channel scales ``applied`` against the SE's ``target``, over all samples and channels."""
    total = float(((target - target.mean()) ** 2).sum())
    residual = float(((applied - target) ** 2).sum())
    return 1 - residual / total if total > 0 else float(residual == 0)


@dataclass(frozen=True)
class FoldedFit:
    """A kernel and per-channel factor for one block, and the R² of the scales they apply."""

    kernel: torch.Tensor
    factor: torch.Tensor
    scale_r2: float


def fit_folded(samples: BlockSamples, gate: str, kernel_size: int, kind: FoldKind) -> FoldedFit:
    """The closed-form fold fit (see the module docstring): ``f = mean_n S / h``, the kernel by
    least squares to the gate inverse of ``h S / mean_n S`` on descriptors ``f * y`` (``norm``)
    or ``y`` (``conv``), then, for ``conv``, ``f`` refitted per channel given the gate values."""
    y, s = samples.y(), samples.s()
    level = float(gate_value(gate, torch.zeros(())))
    mean = s.mean(0)
    live = mean.abs() > 1e-12  # a channel the SE always closes gets f = 0: exact
    factor = torch.where(live, mean / level, torch.zeros_like(mean))
    ratio = torch.where(live, level * s / torch.where(live, mean, torch.ones_like(mean)), level)
    seen = y * factor if kind is FoldKind.NORM else y
    problem = NormalEquations(kernel_size)
    problem.add(seen, inverse_gate(gate, ratio))
    kernel = problem.solve()[0]
    g = gate_value(gate, eca_scores(seen, kernel))
    if kind is FoldKind.CONV:  # the gate does not depend on f: least squares per channel
        gg = (g * g).sum(0)
        factor = torch.where(gg > 0, (g * s).sum(0) / gg.clamp_min(1e-300), factor)
    return FoldedFit(kernel, factor, scale_r2(factor * g, s))


def plain_scale_r2(samples: BlockSamples, gate: str, kernel: torch.Tensor) -> float:
    """R² of the scales an unfolded ECA with ``kernel`` applies, against the SE's."""
    return scale_r2(gate_value(gate, eca_scores(samples.y(), kernel)), samples.s())


def fold_fits(
    model: nn.Module,
    edits: list[Edit],
    fits: list[BlockFit],
    samples: dict[str, BlockSamples],
    sites: dict[str, Neighbours] | None,
    check: Callable[[nn.Module], Any],
) -> list[BlockFit]:
    """Refit each block of the patched ``model`` with its factor folded where ``sites`` allow
    (None: no fold) and ``apply_folds`` verifies it on ``check``; the fits with the fold
    entries. A block whose fold fails keeps its plain kernel (and is recorded as unfolded)."""
    convs = {e.path: model.get_submodule(e.eca_path).conv for e in edits}
    plain = {p: conv.weight.detach().clone() for p, conv in convs.items()}
    unfolded = {e.path: plain_scale_r2(samples[e.path], e.gate, plain[e.path]) for e in edits}
    folded: dict[str, FoldedFit] = {}
    candidates: dict[str, tuple[FoldSite, torch.Tensor]] = {}
    for edit in edits:
        site = sites[edit.path].site if sites else None
        if site is not None:
            folded[edit.path] = fit_folded(samples[edit.path], edit.gate, edit.kernel_size, site.kind)
            with torch.no_grad():
                convs[edit.path].weight.copy_(folded[edit.path].kernel.view_as(plain[edit.path]))
            candidates[edit.eca_path] = (site, folded[edit.path].factor)
    failed = apply_folds(model, candidates, check)
    records = []
    for edit, fit in zip(edits, fits, strict=True):
        site = sites[edit.path].site if sites else None
        reason = "not asked (no fold)" if sites is None else sites[edit.path].reason
        if site is not None and edit.eca_path in failed:
            site, reason = None, failed[edit.eca_path]
            with torch.no_grad():
                convs[edit.path].weight.copy_(plain[edit.path])
        r2 = folded[edit.path].scale_r2 if site is not None else unfolded[edit.path]
        records.append(
            replace(fit, **site_record(site, reason), scale_r2=r2, scale_r2_unfolded=unfolded[edit.path])
        )
    return records


def fold_sites(model: nn.Module, edits: list[Edit], batches: list[torch.Tensor]) -> dict[str, Neighbours]:
    """The fold sites of ``edits``' SE blocks in the original ``model``, traced on a few inputs."""
    return find_sites(model, [e.path for e in edits], lambda m: run(m, [batches[0][:2]]))


@dataclass(frozen=True)
class ScaleFit:
    """How well a converted block's applied channel scales (ECA gate times the folded factor)
    follow the scales its SE block applied, on the same inputs: R² over all samples and
    channels, and where its factor is folded (None: unfolded)."""

    path: str
    channels: int
    samples: int
    r2: float
    fold: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eca_at(patched: nn.Module, path: str) -> nn.Module | None:
    from timm.layers import EcaModule

    try:
        module = patched.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, EcaModule) else None


@torch.no_grad()
def channel_scale_r2(original: nn.Module, patched: nn.Module, batches: list[torch.Tensor]) -> list[ScaleFit]:
    """Per SE block of ``original`` that ``patched`` replaces with an ECA: the R² of the
    channel scales the ECA applies against the SE's, both fed the original's activations on
    ``batches`` (e.g. held-out images). A folded factor is read back from the tensors of its
    site (``fold.factor_in``), so this needs only the two models, both in eval mode."""
    paths = [b.path for b in find_se_blocks(original) if _eca_at(patched, b.path) is not None]
    samples, _ = record_samples(original, paths, batches)
    sites = find_sites(original, paths, lambda m: run(m, [batches[0][:2]]))
    fits = []
    for path in paths:
        eca, y, s = _eca_at(patched, path), samples[path].y(), samples[path].s()
        into, out = (
            factor_in(original, patched, site) if site else torch.ones(y.shape[1], dtype=torch.float64)
            for site in (sites[path].producer, sites[path].consumer)
        )
        gate = eca.gate(eca_scores(into * y, eca.conv.weight))
        kinds = [
            k
            for k, f in ((FoldKind.NORM, into), (FoldKind.CONV, out))
            if not torch.equal(f, torch.ones_like(f))
        ]
        fold = kinds[0].value if kinds else None
        fits.append(ScaleFit(path, y.shape[1], y.shape[0], scale_r2(into * out * gate, s), fold))
    return fits
