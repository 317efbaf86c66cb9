"""Source weights: a state_dict from a local file or from timm's pretrained (Hugging Face) cache.

Only safe formats are read: safetensors, and PyTorch pickles through
``torch.load(..., weights_only=True)``, which refuses any object that is not plain
tensors and containers, so a malicious checkpoint is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def read_safetensors(
    path: str | Path, hint: str = "Pass a .safetensors file saved from the source model's state_dict."
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with clear errors ending in ``hint``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist; check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable safetensors file ({exc}). {hint}"
        ) from None
    return tensors, metadata


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    try:
        # unwraps 'state_dict_ema' / 'model_ema' / 'state_dict' / 'model' and a 'module.' prefix
        return load_state_dict(str(path), use_ema=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        if "Unsupported global" not in str(exc):
            raise CheckpointError(
                f"Checkpoint {str(path)!r} is not a readable PyTorch file ({str(exc).splitlines()[0]}). "
                "Pass a .safetensors file or a .pth/.pt/.bin state_dict."
            ) from None
        found = re.search(r"Unsupported globals?:? ?([^.]*(?:\.[\w]+)*)", str(exc))
        first = f"Unsupported globals: {found.group(1).strip()}" if found else "objects other than tensors"
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds more than tensors (Python objects that would have to be "
            f"unpickled: {first}); eca-surgery loads PyTorch files with weights_only=True and never "
            "executes such code. Re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) "
            "or as safetensors."
        ) from None
    except (EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable PyTorch file ({str(exc).splitlines()[0]}). "
            "Pass a .safetensors file or a .pth/.pt/.bin state_dict."
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint file, unwrapped from common training wrappers."""
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist; check the path.")
    if path.suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        state = clean_state_dict(read_safetensors(path)[0])
    bad = (
        [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if isinstance(state, dict)
        else ["(all)"]
    )
    if bad:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a state_dict of tensors (e.g. {bad[0]!r}); "
            "pass the model's state_dict, saved with safetensors or torch.save."
        )
    return state


def pretrained_file(model_name: str, flag: str = "--checkpoint") -> tuple[Path, str]:
    """The local file of timm's pretrained weights for ``model_name``, from the Hugging Face
    cache (downloading only when the network allows); and a description of the source."""
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .models import create_model

    cfg = create_model(model_name, meta=True).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise CheckpointError(
            f"timm has no Hugging Face weights for {model_name!r} (its pretrained config names no "
            f"hf_hub_id). Download the weights yourself and pass them with {flag} FILE."
        )
    hub_id, _, revision = hub_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        for local_only in (True,) if offline else (True, False):
            try:
                path = hf_hub_download(
                    hub_id,
                    filename,
                    revision=revision or None,
                    local_files_only=local_only,
                    library_name="timm",
                    library_version=timm.__version__,
                )
                return Path(path), f"timm pretrained {hub_id}/{filename}"
            except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
                errors.append(type(exc).__name__)
    raise CheckpointError(
        f"The pretrained weights of {model_name!r} ({hub_id}) are not in the Hugging Face cache and "
        "could not be downloaded (no network?). Download them where you have a network "
        f"(e.g. `hf download {hub_id}`) and copy the cache, or pass a local file with {flag} FILE."
    )
