"""timm-native ECA variants: the timm model name and kwargs that build a patched model
directly, so its weights load into plain timm with no eca-surgery installed.

Candidates come from what timm's families expose: ResNet's ``block_args`` attention
layer, EfficientNet's ``se_layer``, ByobNet's and NFNet's ``attn_layer``, VoVNet's
``attn``, MaxViT/CoAtNet's ``conv_attn_layer``. A candidate is accepted only if timm
builds it (on the meta device) with exactly the patched model's state_dict keys and
shapes, and every ECA uses the sigmoid gate of timm's ``EcaModule``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import current_umask
from .errors import SurgeryError
from .plan import Plan


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


def find_native(model_name: str, model_kwargs: dict[str, Any], patched: nn.Module, plan: Plan) -> dict | None:
    """``{"model": name, "kwargs": {...}}`` that makes timm build ``patched`` itself, or None."""
    import timm

    if not plan.edits or any(e.gate != "sigmoid" for e in plan.edits):
        return None
    target = _shapes(patched)
    for kwargs in _candidates(patched, model_kwargs):
        try:
            with torch.device("meta"):
                candidate = timm.create_model(model_name, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - a family that cannot take the argument is simply not native
            continue
        if _shapes(candidate) == target:
            return {"model": model_name, "kwargs": kwargs}
    return None


def build_native(native: dict) -> nn.Module:
    """The timm-native model, on the meta device, ready for ``load_state_dict(assign=True)``."""
    import timm

    with torch.device("meta"):
        return timm.create_model(native["model"], pretrained=False, **native["kwargs"])


def check_timm_dir(path: str | Path, force: bool) -> Path:
    """Refuse a --timm-dir that exists (without ``force``) or whose parent folder does not."""
    path = Path(path)
    if path.exists() and not force:
        raise SurgeryError(
            f"{str(path)!r} already exists and was left untouched; pass --force to replace it."
        )
    if not path.parent.is_dir():
        raise SurgeryError(f"The folder that would hold {str(path)!r} does not exist; create it first.")
    return path


def save_timm_dir(
    native: dict, state_dict: dict[str, torch.Tensor], path: str | Path, force: bool = False
) -> Path:
    """Write ``path`` as a timm / Hugging Face model folder (config.json + model.safetensors)
    that ``timm.create_model('local-dir:PATH', pretrained=True)`` loads with plain timm.

    The folder is written beside ``path`` under a temporary name and renamed into place.
    """
    from timm.models import save_for_hf

    path = check_timm_dir(path, force)
    model = build_native(native)
    model.load_state_dict(state_dict, strict=True, assign=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_for_hf(
            model, str(tmp), model_args=json.loads(json.dumps(native["kwargs"])), safe_serialization=True
        )
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the modes mkdir and open would
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
