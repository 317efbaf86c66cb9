"""What counts as a Squeeze-and-Excitation block, and where its channel count lives.

Each known SE class has a small adapter that reads the block's channel count from
its own weights (the squeeze convolution's input channels), never from the block's
constructor arguments or its parent: several timm models run SE on a block's
expanded channels, not its output channels. Shapes are read, not values, so this
works on models built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """How to read one SE class: the weight whose input channels are the block's channels."""

    cls: type[nn.Module]
    squeeze: str

    def channels(self, module: nn.Module) -> int:
        return int(module.get_submodule(self.squeeze).weight.shape[1])

    def gate(self, module: nn.Module) -> type[nn.Module] | None:
        gate = getattr(module, "gate", None)
        return type(gate) if isinstance(gate, nn.Module) else None


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _adapters() -> list[SEAdapter]:
    from timm.layers import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite

    return [
        SEAdapter(SEModule, "fc1"),
        SEAdapter(EffectiveSEModule, "fc"),
        SEAdapter(SqueezeExcite, "conv_reduce"),
    ]


def find_adapter(module: nn.Module) -> SEAdapter | None:
    """The adapter for ``module`` if it is a known SE block, else None."""
    for adapter in _adapters():
        if isinstance(module, adapter.cls):
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
    if len(pointwise) != 2 or not gated:
        return False
    reduce, expand = (c.weight.shape for c in pointwise)
    return reduce[1] == expand[0] and reduce[0] == expand[1] and reduce[0] < reduce[1]


def find_unknown_se_like(model: nn.Module) -> list[str]:
    """Paths of modules that look like SE blocks but have no adapter, so are not converted."""
    return [
        f"{path} ({qualified_name(type(m))})"
        for path, m in model.named_modules()
        if find_adapter(m) is None and looks_se_like(m)
    ]
