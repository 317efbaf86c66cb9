"""What counts as a Squeeze-and-Excitation block, and where its channel count lives.

Each SE-like class in timm has a small adapter that says which of its layers squeezes
(whose input channels are the block's channels C, read from the weight's shape, never
from the block's constructor arguments or its parent: several timm models run SE on a
block's expanded channels) and which attribute is its gate. Shapes are read, not
values, so detection works on models built on the meta device.

Known classes (timm 1.0.31 census: 353 models): ``timm.layers.SEModule`` (ResNet,
RegNetY, ReXNet with a BatchNorm, GCViT without bias, MaxViT/CoAtNet, ByobNet, NFNet,
FastViT, ...), ``timm.layers.EffectiveSEModule`` (VoVNet, CSPNeXt, RDNet),
EfficientNet/MobileNetV3/GhostNet ``SqueezeExcite``, the legacy SENets'
``timm.models.senet.SEModule`` and HGNet's ``EseModule``. Global-context,
split-attention, selective-kernel and CBAM blocks are not SE and are left alone.
Modules that look like SE by structure but have no adapter are reported by
``find_unknown_se_like``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from torch import nn


@dataclass(frozen=True)
class SEBlock:
    """One SE block found in a model."""

    path: str
    module: nn.Module
    channels: int
    gate: type[nn.Module] | None

    @property
    def class_name(self) -> str:
        return qualified_name(type(self.module))


@dataclass(frozen=True)
class SEAdapter:
    """How to read one SE class: its squeeze layer (weight ``(r, C, 1, 1)``, or ``(C, C, 1, 1)``
    for the single-layer 'effective' SE) and its gate attribute."""

    cls: type[nn.Module]
    squeeze: str
    gate_attr: str = "gate"

    def channels(self, module: nn.Module) -> int:
        return int(module.get_submodule(self.squeeze).weight.shape[1])

    def gate(self, module: nn.Module) -> type[nn.Module] | None:
        gate = getattr(module, self.gate_attr, None)
        return type(gate) if isinstance(gate, nn.Module) else None


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# (module, class, squeeze layer, gate attribute) of every SE-like class timm has
_KNOWN = (
    ("timm.layers.squeeze_excite", "SEModule", "fc1", "gate"),
    ("timm.layers.squeeze_excite", "EffectiveSEModule", "fc", "gate"),
    ("timm.models._efficientnet_blocks", "SqueezeExcite", "conv_reduce", "gate"),
    ("timm.models.senet", "SEModule", "fc1", "sigmoid"),
    ("timm.models.hgnet", "EseModule", "conv", "sigmoid"),
)


@cache
def adapters() -> tuple[SEAdapter, ...]:
    """Adapters for the SE classes of the installed timm (a class it lacks is skipped)."""
    found = []
    for module_name, cls_name, squeeze, gate in _KNOWN:
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue
        found.append(SEAdapter(cls, squeeze, gate))
    return tuple(found)


def find_adapter(module: nn.Module) -> SEAdapter | None:
    """The adapter for ``module`` if it is a known SE block, else None."""
    for adapter in adapters():
        if type(module) is adapter.cls:
            return adapter
    return None


def find_se_blocks(model: nn.Module) -> list[SEBlock]:
    """Every SE block of ``model``, in module-tree order."""
    found = []
    for path, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is not None:
            found.append(SEBlock(path, module, adapter.channels(module), adapter.gate(module)))
    return found


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def looks_se_like(module: nn.Module) -> bool:
    """By structure alone: a squeeze (pointwise C -> r) and an excite (r -> C) layer,
    with r < C, and a gate, among a handful of direct children."""
    children = list(module.children())
    if not 2 <= len(children) <= 8:
        return False
    pointwise = [c for c in children if _is_pointwise(c)]
    gated = any("gate" in n or "sigmoid" in type(c).__name__.lower() for n, c in module.named_children())
    if not gated or len(pointwise) not in (1, 2):
        return False
    if len(pointwise) == 1:  # 'effective' SE: one C -> C layer
        return pointwise[0].weight.shape[0] == pointwise[0].weight.shape[1]
    reduce, expand = (c.weight.shape for c in pointwise)
    return reduce[1] == expand[0] and reduce[0] == expand[1] and reduce[0] <= reduce[1]


def find_unknown_se_like(model: nn.Module) -> list[str]:
    """Paths of modules that look like SE blocks but have no adapter, so are not converted."""
    return [
        f"{path} ({qualified_name(type(m))})"
        for path, m in model.named_modules()
        if find_adapter(m) is None and looks_se_like(m)
    ]
