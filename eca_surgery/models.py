"""Building timm models and loading source weights into them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SurgeryError, sample_keys


def create_model(name: str, *, meta: bool = False, **kwargs: Any) -> nn.Module:
    """Build timm model ``name`` with random weights (``pretrained=False``).

    With ``meta=True`` nothing is allocated or initialised: parameters live on the
    meta device, which is enough for planning and for loading weights by assignment.
    """
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SurgeryError(
            f"Unknown model {name!r}: timm has no such architecture.{hint} "
            "`python -c \"import timm; print(timm.list_models('*se*'))\"` lists the names."
        )
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError, AssertionError) as exc:
        hint = ""
        if "out_indices" in kwargs:
            with torch.device("meta"):
                stages = [d["module"] for d in timm.create_model(name, pretrained=False).feature_info]
            hint = (
                f" {name} has {len(stages)} feature maps: "
                + ", ".join(f"{i}: {m}" for i, m in enumerate(stages))
                + "."
            )
        raise SurgeryError(
            f"timm could not build {name!r} with {kwargs}: {exc or type(exc).__name__}.{hint}"
        ) from None


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's default (C, H, W) input size, from its timm pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def check_fits(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], what: str, name: str) -> None:
    """Raise CheckpointError unless ``shapes`` (key -> shape) has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {tuple(shapes[k])} in the file, {expected[k]} in the model"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label}: {sample_keys(keys)}")
    raise CheckpointError(
        f"{what} does not fit {name}: {'; '.join(parts)}. Pass a checkpoint saved from "
        f"this same architecture ({name}), or name the model the checkpoint was saved from."
    )


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, by assignment when the model is on
    the meta device (no copy, no initialisation), by copy otherwise."""
    on_meta = any(t.is_meta for t in _tensors(model))
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    left = [n for n, t in _named_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
    return model


def has_only_persistent_state(model: nn.Module) -> bool:
    """True when the state_dict covers every tensor, so a meta build loses nothing."""
    return not any(m._non_persistent_buffers_set for m in model.modules())


def loadable(meta_model: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """``meta_model`` if a state_dict can fill all of it by assignment, else a real build of
    ``name`` (non-persistent buffers are not in a state_dict and must be initialised)."""
    return meta_model if has_only_persistent_state(meta_model) else create_model(name, **kwargs)


def build_with_weights(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    strict: bool = True,
    meta_model: nn.Module | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, list[str]]]:
    """Build ``name`` and load ``state_dict`` into it.

    Strict (the default): the state_dict must fit exactly (else CheckpointError), and the
    model is built on the meta device and loaded by assignment, so no weight is
    initialised only to be overwritten. Non-strict: the model is initialised, the
    tensors that fit are loaded, and the report lists what was left at initialisation
    (missing) and what was ignored (unexpected or of the wrong shape). ``meta_model``, a
    fresh meta-device build of ``name``, is used instead of building another.
    """
    model = meta_model if meta_model is not None else create_model(name, meta=True, **kwargs)
    if not strict:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fits = {k: v for k, v in state_dict.items() if expected.get(k) == tuple(v.shape)}
        model = create_model(name, **kwargs)
        model.load_state_dict(fits, strict=False)
        report = {
            "missing": [k for k in expected if k not in fits],
            "ignored": [k for k in state_dict if k not in fits],
        }
        return model, report
    check_fits(model, shapes_of(state_dict), what, name)
    return load_into(loadable(model, name, **kwargs), state_dict), {"missing": [], "ignored": []}


def _tensors(model: nn.Module):
    return (t for _, t in _named_tensors(model))


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
