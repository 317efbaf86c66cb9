"""A model's stages, from timm's ``feature_info`` or, where it has none, traced.

Stages are looked for in the model's backbone (:func:`eca_surgery.locate.backbone_path`:
torchvision's detection and segmentation models keep their feature extractor under
``backbone``, or ``backbone.body`` under an FPN). A model without timm's
``feature_info`` (torchvision's, a user's own CNN) gets its stages traced: one pass on a
zero image follows the tensor that each module hands to the next along the backbone's
main path, and a stage ends where the feature map changes size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from itertools import groupby

import torch
from torch import nn

from .errors import SurgeryError, summary
from .locate import backbone_path, stage_paths
from .probe import eval_mode, zero_image


@dataclass(frozen=True)
class Stages:
    """A model's stages as module paths, in order, and how they were found: ``feature_info``
    (timm's own list) or ``traced`` (the last module of each feature-map size along the
    backbone's main path, see :func:`traced_stages`)."""

    paths: list[str]
    how: str


def model_stages(model: nn.Module) -> Stages:
    """timm's ``feature_info`` stages where the model has them, else the traced ones."""
    if getattr(model, "feature_info", None) is not None:
        return Stages(stage_paths(model), "feature_info")
    return Stages(traced_stages(model), "traced")


@dataclass
class _Call:
    """One module call seen by the trace: the call that encloses it, its input and output."""

    path: str
    parent: int | None
    input: object
    output: object = None


def _trace(model: nn.Module, root: str) -> list[_Call]:
    """Run the module at ``root`` once on a zero image of the model's input size, with hooks
    on every module under it; return its calls in the order they started (the root first)."""
    calls: list[_Call] = []
    stack: list[int] = []
    handles = []

    def enter(path, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)  # `block(x=...)` too
        calls.append(_Call(path, stack[-1] if stack else None, first))
        stack.append(len(calls) - 1)

    def leave(path, module, args, output):
        calls[stack.pop()].output = output

    top = model.get_submodule(root)
    prefix = f"{root}." if root else ""
    for name, module in top.named_modules():
        path = f"{prefix}{name}" if name else root
        handles.append(module.register_forward_pre_hook(partial(enter, path), with_kwargs=True))
        handles.append(module.register_forward_hook(partial(leave, path)))
    x = zero_image(model)
    try:
        with torch.no_grad(), eval_mode(model):
            top(x)
    except Exception as exc:  # a model that cannot run on this input has no traced stages
        raise SurgeryError(
            f"Cannot trace the stages of {type(model).__name__}: running "
            f"{root or 'the model'} on a zero image of size {tuple(x.shape)} failed ({summary(exc)}). "
            "Select modules by 'path', 'regex' or 'class' instead."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _chain(calls: list[_Call], index: int) -> list[int]:
    """The calls directly inside call ``index`` that form its main path: each takes the
    previous one's output tensor (the first, the call's own input) and gives a tensor."""
    main, chain = calls[index].input, []
    for j in range(index + 1, len(calls)):
        call = calls[j]
        if call.parent == index and call.input is main and isinstance(call.output, torch.Tensor):
            chain.append(j)
            main = call.output
    return chain


def _size(value: object) -> tuple[int, int] | None:
    """The (H, W) of an NCHW map that a square input gives (H == W > 1), else None."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] == value.shape[3] > 1:
        return (value.shape[2], value.shape[3])
    return None


def _feature_size(value: object, image: tuple[int, ...]) -> tuple[int, int] | None:
    """:func:`_size` of a feature map; None for a map of the image's own shape (a quantizable
    model's ``QuantStub``, a normalising layer): an ECA there would gate the RGB channels."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) == image:
        return None
    return _size(value)


def _flat_chain(calls: list[_Call], index: int) -> list[int]:
    """The main path of call ``index``, with each member that holds whole stages (maps of a
    size other than its input's and output's: MobileNet's ``features``, RegNet's
    ``trunk_output``) opened into its own path. A block that only downsamples stays whole."""
    flat = []
    for j in _chain(calls, index):
        inner = _chain(calls, j)
        whole = bool(inner) and calls[inner[-1]].output is calls[j].output
        ends = {_size(calls[j].input), _size(calls[j].output)}
        if whole and {_size(calls[k].output) for k in inner} - ends:
            flat.extend(_flat_chain(calls, j))
        else:
            flat.append(j)
    return flat


def traced_stages(model: nn.Module) -> list[str]:
    """The stages of a model without ``feature_info`` (torchvision's, any CNN): along the main
    path of its backbone (:func:`backbone_path`), the last module of each run of feature maps
    of one size (NCHW, square, larger than 1x1, not the image's own shape), found by one
    pass (free on the meta device)."""
    calls = _trace(model, backbone_path(model))
    runs = Counter(call.path for call in calls)
    image = tuple(calls[0].input.shape)
    stages = []
    for size, run in groupby(_flat_chain(calls, 0), key=lambda j: _feature_size(calls[j].output, image)):
        end = _run_end(calls, runs, list(run)) if size is not None else None
        if end is not None:
            stages.append(calls[end].path)
    return stages


def _run_end(calls: list[_Call], runs: Counter, run: list[int]) -> int | None:
    """The last call of ``run`` whose module runs once (an ECA after a shared module would run
    at each of its calls), or the enclosing call that gives the same output and runs once."""
    for j in reversed(run):
        while runs[calls[j].path] > 1:
            parent = calls[j].parent
            if not parent or calls[parent].output is not calls[j].output:
                break
            j = parent
        else:
            return j
    return None
