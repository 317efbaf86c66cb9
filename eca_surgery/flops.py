"""Multiply-accumulate counts, as timm's model cards give them (GMACs).

Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-add of convolutions and matrix products (elementwise work such as pooling,
gates and the channel rescale is not counted, as in timm's cards); we print MACs =
FLOPs / 2. On the meta device the count costs no compute.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import summary
from .models import input_size


def count_macs(model: nn.Module, size: tuple[int, int, int] | None = None) -> int | None:
    """MACs of one forward pass at batch 1 and the model's default input size, or None
    where the model cannot run on its device without data (counting is best-effort)."""
    return count_macs_or_reason(model, size)[0]


@torch.no_grad()
def count_macs_or_reason(
    model: nn.Module, size: tuple[int, int, int] | None = None
) -> tuple[int | None, str | None]:
    """``(MACs, None)``, or ``(None, why)`` where the model could not be run to count them."""
    ref = next(model.parameters())
    x = torch.empty(1, *(size or input_size(model)), device=ref.device, dtype=ref.dtype)
    training = {m: m.training for m in model.modules()}
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(x)
    except Exception as exc:  # noqa: BLE001 - some ops have no meta kernel; a report without FLOPs is still useful
        return None, f"the model could not run on a {'x'.join(map(str, x.shape))} input ({summary(exc)})"
    finally:
        for m, mode in training.items():
            m.training = mode
    return counter.get_total_flops() // 2, None
