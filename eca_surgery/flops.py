"""Multiply-accumulate counts, as timm's model cards give them (GMACs).

Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-add of convolutions and matrix products (elementwise work such as pooling,
gates and the channel rescale is not counted, as in timm's cards); we print MACs =
FLOPs / 2. On the meta device the count costs no compute.

torchvision's detection models cannot be counted whole (their postprocessing needs data:
``nonzero`` on the meta device); for them, and any torchvision detection or segmentation
model whose forward fails, the backbone (``locate.backbone_path``) is counted instead, at
``models.DENSE_INPUT_SIZE``, and the count says so (its scope names the backbone).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import summary
from .locate import backbone_path
from .models import input_size
from .probe import zero_image


def count_macs(model: nn.Module, size: tuple[int, int, int] | None = None) -> int | None:
    """MACs of one forward pass at batch 1 and the model's default input size, or None
    where the model cannot run on its device without data (counting is best-effort)."""
    return count_macs_or_reason(model, size)[0]


@torch.no_grad()
def count_macs_or_reason(
    model: nn.Module, size: tuple[int, int, int] | None = None
) -> tuple[int | None, str | None]:
    """``(MACs, None)``, or ``(None, why)`` where the model could not be run to count them."""
    x = zero_image(model, size)
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


def count_macs_scoped(
    model: nn.Module, size: tuple[int, int, int] | None = None
) -> tuple[int | None, str | None, str]:
    """``(MACs, why not, scope)``: those of the whole model (scope ''), or, where a torchvision
    detection or segmentation model cannot be counted whole, those of its backbone (scope:
    the backbone's path, e.g. ``backbone.body``) at the model's input size."""
    macs, why = count_macs_or_reason(model, size)
    path = backbone_path(model)
    if macs is None and path:
        backbone, _ = count_macs_or_reason(model.get_submodule(path), size or input_size(model))
        if backbone is not None:
            return backbone, None, path
    return macs, why, ""
