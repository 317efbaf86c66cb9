"""timm-native ECA variants: the timm model name and kwargs that build a patched model
directly, so its weights load into plain timm with no eca-surgery installed.

Candidates come from what timm's families expose: ResNet's ``block_args`` attention
layer, EfficientNet's ``se_layer``, ByobNet's and NFNet's ``attn_layer``, VoVNet's
``attn``, MaxViT/CoAtNet's ``conv_attn_layer``. A candidate is accepted only if timm
builds it (on the meta device) with exactly the patched model's state_dict keys and
shapes, and every ECA uses the sigmoid gate of timm's ``EcaModule``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import ModelCard
from .checkpoint import safetensors_io_errors, tensor_bytes
from .edits import Gate
from .errors import CheckpointError, SurgeryError
from .facts import UNKNOWN, BuildFacts, shapes_digest, spelled
from .models import check_has_data, check_matches, create_model
from .outputs import atomic_write_dir, check_dir_output
from .plan import Plan

EXPORT_KIND = "timm-dir"
NOT_NATIVE = (
    "timm cannot build this ECA variant of {model} itself, so there is no timm-native folder to write "
    "(timm builds ECA with sigmoid gates for ResNet/ResNeXt, EfficientNet, ByobNet, NFNet, VoVNet "
    "and MaxViT/CoAtNet). Use the eca-surgery checkpoint with eca_surgery.load_patched instead."
)


def timm_kernel_size(channels: int) -> int:
    """The kernel size timm's ``EcaModule(channels)`` uses (the adaptive rule with gamma=2,
    b=1 and its floor of 3), read from the module timm builds, on the meta device."""
    from timm.layers import EcaModule

    with torch.device("meta"):
        return EcaModule(channels).conv.kernel_size[0]


def native_obstacle(plan: Plan) -> str | None:
    """Why timm could not build the patched model of ``plan`` whatever the family, or None.

    timm's own ECA (``EcaModule(channels)``, as its models create it) always has the
    adaptive kernel size (gamma=2, b=1, at least 3) and a sigmoid gate; the first edit
    with another kernel size or gate is named. Needs only the plan (no weights).
    """
    if not plan.edits:
        return f"The recipe changes nothing in {plan.model}, so there is no timm-native folder to write."
    for e in plan.edits:
        if e.gate != Gate.SIGMOID:
            return (
                f"timm builds ECA only with the sigmoid gate, but the ECA at {e.eca_path!r} has a "
                f"{e.gate} gate, so timm cannot build this variant of {plan.model} and there is no "
                "timm-native folder to write. Use a sigmoid gate, or load the eca-surgery checkpoint "
                "with eca_surgery.load_patched instead."
            )
        k = timm_kernel_size(e.channels)
        if e.kernel_size != k:
            return (
                f"timm builds ECA with the adaptive kernel size (gamma=2, b=1, at least 3), but the ECA at "
                f"{e.eca_path!r} ({e.channels} channels) has kernel size {e.kernel_size} where timm would "
                f"use {k}, so timm cannot build this variant of {plan.model} and there is no timm-native "
                "folder to write. Use the recipe's default kernel sizes, or load the eca-surgery "
                "checkpoint with eca_surgery.load_patched instead."
            )
    return None


def check_native(model_name: str, model_kwargs: dict[str, Any], meta_model: nn.Module, plan: Plan) -> dict:
    """The timm-native variant of ``plan`` on ``meta_model`` (a meta-device build it
    patches: pass a copy you no longer need); a SurgeryError with the reason if timm
    cannot build it. Loads no weights."""
    from .apply import apply_plan

    reason = native_obstacle(plan)
    if reason is not None:
        raise SurgeryError(reason)
    native = find_native(model_name, model_kwargs, apply_plan(meta_model, plan), plan, built=True)
    if native is None:
        raise SurgeryError(NOT_NATIVE.format(model=model_name))
    return native


def _candidates(model: nn.Module, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        return [{**kwargs, "block_args": {**kwargs.get("block_args", {}), "attn_layer": "eca"}}]
    return [
        {**kwargs, **extra}
        for extra in (
            {"se_layer": "eca"},
            {"attn_layer": "eca", "attn_kwargs": {}},
            {"attn": "eca"},
            {"conv_attn_layer": "eca"},
        )
    ]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# what find_native learnt in this process: the digest of the key -> shape map timm built for a
# model name and kwargs (None: timm cannot build it), and per model class, the candidate that matched
_BUILT: dict[str, str | None] = {}
_FAMILY: dict[type, int] = {}
_CACHE_SIZE = 256


def _built_digest(model_name: str, kwargs: dict[str, Any], facts: BuildFacts) -> str | None:
    """The digest (``facts.shapes_digest``) of the key -> shape map of timm's meta-device build
    of ``model_name`` with ``kwargs``, or None where timm cannot build it: built once per process
    (kwargs JSON cannot spell exactly, every time), and the cache folder (``facts``) corrected
    to it; no weights are made."""
    key = spelled([model_name, kwargs])
    digest = _memo(key)
    if digest is UNKNOWN:
        try:
            digest = shapes_digest(_shapes(create_model(model_name, meta=True, **kwargs)))
        except Exception:  # noqa: BLE001 - a family that cannot take the argument is simply not native
            digest = None
        if len(_BUILT) >= _CACHE_SIZE:
            _BUILT.clear()
        if key is not None:
            _BUILT[key] = digest
    if facts.native(kwargs) != digest:
        facts.remember_native(kwargs, digest)
    return digest


def _ruled_out(model_name: str, kwargs: dict[str, Any], facts: BuildFacts, target: str) -> bool:
    """Whether an earlier build of this candidate (in this process, else as the cache folder
    says) gave other shapes than ``target``: it is then not tried again."""
    known = _memo(spelled([model_name, kwargs]))
    if known is UNKNOWN:
        known = facts.native(kwargs)
    return known is not UNKNOWN and known != target


def _memo(key: str | None) -> str | None | object:
    """What ``_BUILT`` holds for ``key``, or ``UNKNOWN``: read in one step, since another
    thread's convert may empty it between a membership test and a read."""
    return UNKNOWN if key is None else _BUILT.get(key, UNKNOWN)


def find_native(
    model_name: str, model_kwargs: dict[str, Any], patched: nn.Module, plan: Plan, built: bool = False
) -> dict | None:
    """``{"model": name, "kwargs": {...}}`` that makes timm build ``patched`` itself, or None.

    Compares key -> shape maps (by digest): the patched model's (read off its tensors, no copy)
    with those of timm's meta-device builds of the candidates, trying first the one that matched
    for the same model class before. A candidate an earlier run built with other shapes (in this
    process, or as the cache folder, ``facts``, says) is skipped, unless ``built``; the one that
    matches is always built in this process, so a cache file cannot name kwargs that timm would
    not build."""
    if not plan.edits or any(e.gate != Gate.SIGMOID for e in plan.edits):
        return None
    target = shapes_digest(_shapes(patched))
    candidates = _candidates(patched, model_kwargs)
    first = _FAMILY.get(type(patched), 0)
    facts = BuildFacts.of(model_name, model_kwargs)
    for index in sorted(range(len(candidates)), key=lambda i: i != first):
        if not built and _ruled_out(model_name, candidates[index], facts, target):
            continue
        if _built_digest(model_name, candidates[index], facts) == target:
            _FAMILY[type(patched)] = index
            # a copy: the caller's nested kwargs (a list) changed later must not change the record
            return {"model": model_name, "kwargs": copy.deepcopy(candidates[index])}
    return None


def build_native(native: dict) -> nn.Module:
    """The timm-native model, on the meta device, ready for ``load_state_dict(assign=True)``."""

    return create_model(native["model"], meta=True, **native["kwargs"])


def check_timm_dir(path: str | Path, force: bool, size: int | None = None) -> Path:
    """Refuse a timm folder path that may not be written (see ``outputs.check_dir_output``):
    an existing one without ``force``, or one that is not an earlier export of this tool."""
    return check_dir_output(path, force, EXPORT_KIND, size)


def check_exportable(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Refuse, before anything is written, a state_dict that the timm-native ``model`` cannot
    load as it is: other keys or shapes, tensors of the wrong kind, or no data (meta device),
    as when the converted model was changed after ``convert``."""
    what = "The model to export"
    check_has_data(state_dict, what)
    try:
        check_matches(model, state_dict, what, f"{name} as timm builds it natively")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} Nothing was written: the model no longer matches the conversion (was it changed "
            "after `convert`?); export the converted model as it was made."
        ) from None


def save_timm_dir(
    native: dict,
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    force: bool = False,
    card: ModelCard | None = None,
) -> Path:
    """Write ``path`` as a timm / Hugging Face model folder (config.json + model.safetensors,
    and the model ``card`` as README.md) that ``timm.create_model('local-dir:PATH',
    pretrained=True)`` loads with plain timm.

    The folder is written beside ``path`` under a temporary name, marked as this tool's
    export and renamed into place; only an earlier export (or an empty folder) is replaced.
    """
    from timm.models import save_for_hf

    model = build_native(native)
    check_exportable(model, state_dict, native["model"])
    model.load_state_dict(state_dict, strict=True, assign=True)
    size = tensor_bytes(state_dict)
    model_args = json.loads(json.dumps(native["kwargs"]))

    def write(tmp: Path) -> None:
        with safetensors_io_errors():
            save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card.to_markdown(), encoding="utf-8")

    return atomic_write_dir(path, write, force, EXPORT_KIND, size)
