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
