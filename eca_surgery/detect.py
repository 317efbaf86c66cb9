"""What counts as a Squeeze-and-Excitation block, and where its channel count lives.

Each SE class has an adapter that says which of its layers squeezes (whose input
channels are the block's channels C, read from the weight's shape, never from the
block's constructor arguments or its parent: several timm models run SE on a block's
expanded channels) and which module is its gate. Shapes are read, not values, so
detection works on models built on the meta device.

Built-in classes (timm 1.0.31 census: 353 models): ``timm.layers.SEModule`` (ResNet,
RegNetY, ReXNet with a BatchNorm, GCViT without bias, MaxViT/CoAtNet, ByobNet, NFNet,
FastViT, ...), ``timm.layers.EffectiveSEModule`` (VoVNet, CSPNeXt, RDNet),
EfficientNet/MobileNetV3/GhostNet ``SqueezeExcite``, the legacy SENets'
``timm.models.senet.SEModule``, HGNet's ``EseModule``, and torchvision's
``torchvision.ops.SqueezeExcitation`` (MobileNetV3, EfficientNet, RegNetY, MaxViT and the
detection and segmentation models built on them) with its quantizable subclass.
Global-context, split-attention, selective-kernel and CBAM blocks are not SE and are left
alone. A user teaches the tool another SE class with :func:`register_se`; modules that look
like SE by structure but are unknown are reported by ``find_unknown_se_like``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import SurgeryError, summary

ChannelsSpec = str | Callable[[nn.Module], int]
GateSpec = str | Callable[[nn.Module], nn.Module | None] | None


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
    """How to read one SE class: its channel count (the name of its squeeze layer, whose
    weight is ``(r, C, ...)`` or ``(C, C, 1, 1)`` for the single-layer 'effective' SE, or a
    function of the module) and its gate (an attribute name, a function of the module, or
    None when no gate is known)."""

    cls: type[nn.Module]
    squeeze: ChannelsSpec
    gate_from: GateSpec = "gate"

    def channels(self, module: nn.Module) -> int:
        """The block's channel count C, read from shapes (works on the meta device)."""
        try:
            if callable(self.squeeze):
                channels = self.squeeze(module)
            else:
                channels = module.get_submodule(self.squeeze).weight.shape[1]
        except Exception as exc:  # noqa: BLE001 - a registered function may raise anything
            raise SurgeryError(self._misfit(f"its channels cannot be read ({summary(exc, 200)})")) from exc
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise SurgeryError(self._misfit(f"its channel count is {channels!r}, not a positive int"))
        return int(channels)

    def gate_module(self, module: nn.Module) -> nn.Module | None:
        """The module that gates ``module``'s output, or None if none is known."""
        if self.gate_from is None:
            return None
        if callable(self.gate_from):
            try:
                gate = self.gate_from(module)
            except Exception as exc:  # noqa: BLE001 - a registered function may raise anything
                raise SurgeryError(
                    f"An SE block of class {qualified_name(self.cls)} does not fit how it is registered: its "
                    f"gate cannot be read ({summary(exc, 200)}). Register it again with `gate` naming its gate "
                    "module (e.g. 'gate') or a function returning it: eca_surgery.register_se(cls, gate=...)."
                ) from exc
        else:
            gate = functools.reduce(lambda m, name: getattr(m, name, None), self.gate_from.split("."), module)
        return gate if isinstance(gate, nn.Module) else None

    def gate(self, module: nn.Module) -> type[nn.Module] | None:
        """The class of ``module``'s gate (what ``gate: keep`` reuses), or None."""
        gate = self.gate_module(module)
        return type(gate) if gate is not None else None

    def _misfit(self, problem: str) -> str:
        return (
            f"An SE block of class {qualified_name(self.cls)} does not fit how it is registered: "
            f"{problem}. Register it again with `channels` naming its squeeze layer (a child whose "
            "weight is (r, C, ...)) or a function returning C: eca_surgery.register_se(cls, channels=...)."
        )


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# (module, class, squeeze layer, gate attribute) of every built-in SE class
_KNOWN = (
    ("timm.layers.squeeze_excite", "SEModule", "fc1", "gate"),
    ("timm.layers.squeeze_excite", "EffectiveSEModule", "fc", "gate"),
    ("timm.models._efficientnet_blocks", "SqueezeExcite", "conv_reduce", "gate"),
    ("timm.models.senet", "SEModule", "fc1", "sigmoid"),
    ("timm.models.hgnet", "EseModule", "conv", "sigmoid"),
    ("torchvision.ops.misc", "SqueezeExcitation", "fc1", "scale_activation"),
    (
        "torchvision.models.quantization.mobilenetv3",
        "QuantizableSqueezeExcitation",
        "fc1",
        "scale_activation",
    ),
)
_builtin: dict[type[nn.Module], SEAdapter] = {}
_pending = list(_KNOWN)  # built-in entries whose package was not imported yet
_registered: dict[type[nn.Module], SEAdapter] = {}


def _load_builtins() -> None:
    """Resolve the built-in entries whose package is imported. A package that was never
    imported cannot have made a module of the model, so it is not imported here (timm
    commands do not pay for torchvision); a class the installed version lacks is skipped."""
    for entry in list(_pending):
        module_name, cls_name, squeeze, gate = entry
        if module_name.split(".")[0] not in sys.modules:
            continue
        _pending.remove(entry)
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue
        _builtin[cls] = SEAdapter(cls, squeeze, gate)


def adapters() -> tuple[SEAdapter, ...]:
    """The adapters in force: the registered ones, then the built-in ones they do not replace."""
    _load_builtins()
    return (*_registered.values(), *(a for c, a in _builtin.items() if c not in _registered))


def find_adapter(module: nn.Module) -> SEAdapter | None:
    """The adapter for ``module`` if its class (exactly, not a subclass) is a known SE block."""
    cls = type(module)
    if cls in _registered:
        return _registered[cls]
    _load_builtins()
    return _builtin.get(cls)


def register_se(cls: type[nn.Module], *, channels: ChannelsSpec, gate: GateSpec = None) -> None:
    """Teach every API function (in this process) an SE class of your own: ``find_se_blocks``,
    the planner (``se: true``, ``gate: keep``), ``scan`` and ``init='fit-se'`` then know it.

    ``channels`` is the name of the block's squeeze layer (a child whose weight is ``(r, C,
    ...)``, or ``(C, C, 1, 1)`` for a single-layer SE; C is read from the weight's shape, so
    it works on the meta device) or a function ``module -> int``. ``gate`` is the name of the
    gate module (a sigmoid or hard sigmoid, which ``gate: keep`` reuses and ``fit-se`` fits
    to) or a function ``module -> nn.Module | None``; None means no gate is known, so ``gate:
    keep`` and ``fit-se`` refuse the block. Classes match exactly: a subclass of a registered
    (or built-in) class is not an SE block until it is registered itself. Registering a class
    again replaces its entry (a built-in one included). Example::

        eca_surgery.register_se(MySE, channels="fc1", gate="sigmoid")
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_se: `cls` must be a subclass of torch.nn.Module, not {cls!r}.")
    if cls.__module__.split(".")[:2] == ["torch", "nn"]:
        raise ValueError(
            f"register_se: {qualified_name(cls)} is a torch.nn layer, not an SE block; registering it "
            "would make every such layer an SE block. Give your SE block a class of its own and register that."
        )
    _check_spec("channels", channels, allow_none=False)
    _check_spec("gate", gate, allow_none=True)
    _registered[cls] = SEAdapter(cls, channels, gate)


def _check_spec(name: str, spec: object, allow_none: bool) -> None:
    """A TypeError/ValueError unless ``spec`` is a (dotted) attribute name or a callable."""
    if (spec is None and allow_none) or (callable(spec) and not isinstance(spec, type)):
        return
    if not isinstance(spec, str):
        kinds = (
            "an attribute name, a function of the module or None"
            if allow_none
            else "a layer name or a function of the module"
        )
        raise TypeError(f"register_se: `{name}` must be {kinds}, not {type(spec).__name__} {spec!r}.")
    if not spec or not all(part.isidentifier() or part.isdigit() for part in spec.split(".")):
        raise ValueError(
            f"register_se: `{name}`={spec!r} is not an attribute name (like 'fc1' or 'se.gate')."
        )


def unregister_se(cls: type[nn.Module]) -> None:
    """Forget a class registered with :func:`register_se` (a built-in class it replaced is
    known again); a class that is not registered is left as it is."""
    _registered.pop(cls, None)


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


def _is_gate(name: str, module: nn.Module) -> bool:
    return "gate" in name or "sigmoid" in type(module).__name__.lower()


def looks_se_like(module: nn.Module) -> bool:
    """By structure alone: a squeeze (pointwise C -> r) and an excite (r -> C) layer,
    with r < C, and a gate, among a handful of direct children."""
    children = list(module.children())
    if not 2 <= len(children) <= 8:
        return False
    pointwise = [c for c in children if _is_pointwise(c)]
    gated = any(_is_gate(n, c) for n, c in module.named_children())
    if not gated or len(pointwise) not in (1, 2):
        return False
    if len(pointwise) == 1:  # 'effective' SE: one C -> C layer
        return pointwise[0].weight.shape[0] == pointwise[0].weight.shape[1]
    reduce, expand = (c.weight.shape for c in pointwise)
    return reduce[1] == expand[0] and reduce[0] == expand[1] and reduce[0] <= reduce[1]


def unknown_se_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each module that looks like an SE block but whose class is unknown."""
    return [(p, m) for p, m in model.named_modules() if find_adapter(m) is None and looks_se_like(m)]


def find_unknown_se_like(model: nn.Module) -> list[str]:
    """'PATH (CLASS)' of modules that look like SE blocks but are unknown, so are not converted."""
    return [f"{path} ({qualified_name(type(m))})" for path, m in unknown_se_modules(model)]


def register_call(cls_name: str, channels: str = "<squeeze layer>", gate: str = "<gate attribute>") -> str:
    """The ``register_se`` call that teaches the tool a class, as a hint shows it."""
    return f'eca_surgery.register_se({cls_name}, channels="{channels}", gate="{gate}")'


def register_hint(module: nn.Module) -> str:
    """The ``register_se`` call for an SE-like ``module``'s class, with its squeeze layer and
    gate guessed from its children (the first pointwise layer, the gate-like child)."""
    names = [n for n, c in module.named_children() if _is_pointwise(c)]
    gates = [n for n, c in module.named_children() if _is_gate(n, c)]
    return register_call(type(module).__name__, *(names[:1] or ["<squeeze layer>"]), *(gates[:1] or []))
