"""The ECA block and its adaptive kernel-size rule (ECA-Net, CVPR 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .choices import choice
from .edits import Gate


class DoubleSigmoid(nn.Module):
    """``2 * sigmoid(x)``: 1 at x = 0, so an ECA block with a zero kernel is the identity.

    The gate of ``init='identity'``: an ECA inserted into a trained model then starts as
    exactly the original function. It deviates from the paper's block, whose sigmoid
    gate lies in (0, 1) and halves every channel at a zero kernel; this one lies in
    (0, 2), so training can also amplify channels.
    """

    # no ``inplace`` argument: timm's EcaModule builds its gate with ``create_act_layer(gate_layer)``,
    # which passes none (and retries without it where a class lacks one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(x)


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """Kernel size of the paper's adaptive rule: ``|(log2(C) + b) / gamma|`` rounded to the nearest odd.

    Unlike ``timm.layers.EcaModule(channels=...)``, no floor of 3 is applied, so a
    block on few channels (C < 8 with the defaults) gets the paper's k = 1.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if not (math.isfinite(gamma) and math.isfinite(b)) or gamma == 0:
        raise ValueError(f"gamma and b must be finite numbers and gamma non-zero, got gamma={gamma}, b={b}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def make_eca(
    channels: int,
    kernel_size: int | None = None,
    gamma: float = 2,
    b: float = 1,
    gate: Gate | str = Gate.SIGMOID,
    device=None,
    dtype=None,
) -> nn.Module:
    """Build an ECA block for ``channels`` channels.

    This is timm's own ``EcaModule`` with the kernel size passed explicitly, so the
    parameter is named ``conv.weight`` and a converted checkpoint loads key-for-key
    into timm's ECA models. ``kernel_size`` (odd) overrides the adaptive rule. ``gate`` is a
    :class:`~eca_surgery.edits.Gate` or its value (``"sigmoid"``, ``"hard_sigmoid"``,
    ``"double_sigmoid"``); ValueError for another.
    """
    from timm.layers import EcaModule

    if kernel_size is None:
        kernel_size = eca_kernel_size(channels, gamma, b)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"ECA kernel size must be a positive odd integer, got {kernel_size}")
    gate_layer = _gate_layer(gate)
    return EcaModule(
        channels=None, kernel_size=kernel_size, gate_layer=gate_layer, device=device, dtype=dtype
    )


def _gate_layer(gate: Gate | str) -> str | type[nn.Module]:
    """What timm's EcaModule takes as ``gate_layer`` for ``gate``: timm's own name for the
    sigmoid and hard sigmoid, and :class:`DoubleSigmoid`, which timm lacks."""
    gate = choice(Gate, gate, "gate", ValueError)
    return DoubleSigmoid if gate is Gate.DOUBLE_SIGMOID else gate.value
