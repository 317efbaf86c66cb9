"""Start new ECA blocks from what the model already computes, not from random kernels.

``fit-se``: run the original model on calibration inputs, record at each SE block that
a rule replaces the pooled channel descriptor ``y`` (N, C) and the SE's pre-gate
output ``z`` (N, C), and fit the replacing ECA's 1-D kernel ``w`` by least squares so
that ``conv1d(y, w)`` reproduces ``z``. The problem is linear in ``w`` (each output
channel is a dot product of ``w`` with ``k`` neighbouring entries of ``y``), so it is
solved in closed form from normal equations accumulated per batch in float64. Where
the ECA's gate differs from the SE's (a hard-sigmoid SE replaced by the paper's
sigmoid ECA), the target is the ECA gate's inverse of the SE's gate output instead.

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

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .detect import find_adapter, find_se_blocks
from .errors import SurgeryError
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
    the kernel explains, both over every sample and channel.
    """

    path: str
    channels: int
    kernel_size: int
    samples: int
    rel_error: float
    r2: float
    target: str

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


@torch.no_grad()
def record_se(
    model: nn.Module, edits: list[Edit], batches: list[torch.Tensor]
) -> tuple[dict[str, NormalEquations], dict[str, str], torch.Tensor | list]:
    """Run the original ``model`` on ``batches``; accumulate each SE block's fit problem.

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
