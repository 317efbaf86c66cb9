"""Models whose every state_dict tensor, parameters and buffers alike, holds values that no
initialisation produces, and a bit-for-bit comparison of state_dicts.

timm zero-initialises the last norm of each residual block and PyTorch starts BatchNorm at
running_mean 0, running_var 1, num_batches_tracked 0: a test comparing such tensors (or the
outputs they give) cannot tell a kept tensor from a reset one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and buffer of ``model`` in place and return it.

    Weights get a fan-in scale (outputs stay finite and informative through deep nets), norm
    scales lie in [0.5, 1.5], biases and running means are small Gaussians, running variances
    lie in [0.5, 1.5] (positive) and ``num_batches_tracked`` counts lie in [1, 10000).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(_value(name, p, gen))
    for name, b in model.named_buffers():
        if b.is_floating_point() or name.endswith("num_batches_tracked"):
            b.copy_(_value(name, b, gen))
    return model


def _value(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.randint(1, 10000, t.shape, generator=gen).to(t.dtype)
    if leaf == "running_var" or (leaf == "weight" and t.dim() == 1):
        return torch.rand(t.shape, generator=gen).add_(0.5).to(t.dtype)
    if t.dim() <= 1:  # biases, running means
        return (torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype)
    fan_in = t[0].numel()
    return (torch.randn(t.shape, generator=gen) * fan_in**-0.5).to(t.dtype)


def assert_same_tensors(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of ``expected`` is in ``got``, bit for bit (dtype, shape and values)."""
    missing = sorted(expected.keys() - got.keys())
    assert not missing, f"missing: {missing[:5]}"
    differ = [
        k
        for k, v in expected.items()
        if got[k].dtype != v.dtype or got[k].shape != v.shape or not torch.equal(got[k], v)
    ]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


def has_buffers(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds BatchNorm buffers, all away from their initial values."""
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    return bool(means) and all(m.abs().min() > 0 for m in means) and all(c > 0 for c in counts)
