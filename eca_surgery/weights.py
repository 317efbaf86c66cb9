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
from urllib.parse import urlparse

import torch

from .errors import CheckpointError
from .jsontext import loads_strict
from .paths import stat_input

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def read_safetensors(
    path: str | Path, hint: str = "Pass a .safetensors file saved from the source model's state_dict."
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with clear errors ending in ``hint``."""
    from safetensors import safe_open

    path = Path(path)
    stat_input(path, "Checkpoint", CheckpointError)
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {str(path)!r} is a folder; pass the weights file in it.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist; check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable safetensors file ({_first_line(exc)}). {hint}"
        ) from None
    return tensors, metadata


# safetensors' dtype names, and the largest header it reads (100 MB: its own limit)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}  # fmt: skip
MAX_HEADER = 100_000_000


def read_safetensors_header(
    path: str | Path, hint: str = "Pass a .safetensors file saved from the source model's state_dict."
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as empty meta-device tensors (dtype and shape only),
    from its header alone: 8 bytes of length, then that much JSON (bounded); the data is
    never read. The header is checked as safetensors checks it (every tensor's bytes inside
    the file, the data exactly covered), with the errors of :func:`read_safetensors`."""
    path = Path(path)
    size = _file_size(path)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = loads_strict(f.read(length).decode("utf-8"))
        return _header_tensors(header, size - 8 - length)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:  # UnicodeError is a ValueError
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable safetensors file ({_first_line(exc)}). {hint}"
        ) from None


def _file_size(path: Path) -> int:
    """The size of checkpoint ``path``; a CheckpointError for a folder or a missing file."""
    found = stat_input(path, "Checkpoint", CheckpointError)
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {str(path)!r} is a folder; pass the weights file in it.")
    if found is None:
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist; check the path.")
    if not path.is_file():  # a FIFO or a device: never opened, so never waited on nor read
        raise CheckpointError(f"Checkpoint {str(path)!r} is not a regular file; pass the weights file.")
    return found.st_size


def _header_tensors(header: object, data_size: int) -> dict[str, torch.Tensor]:
    """Meta-device tensors of a parsed safetensors ``header`` whose data takes ``data_size``
    bytes; a ValueError where an entry is malformed or the offsets do not tile the data."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.get("__metadata__")
    metadata = {} if metadata is None else metadata  # safetensors reads a null one as none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not a mapping of strings to strings")
    for text in (*header, *metadata, *metadata.values()):
        text.encode("utf-8")  # a lone surrogate (a "\ud800" escape) is no UTF-8: safetensors refuses it
    tensors, spans = {}, []
    for name in sorted(k for k in header if k != "__metadata__"):  # in safe_open's order
        tensors[name], span = _header_entry(name, header[name], data_size)
        spans.append(span)
    spans.sort()
    ends = [end for _, end in spans]
    if [b for b, _ in spans] != [0, *ends[:-1]][: len(spans)] or (ends[-1] if ends else 0) != data_size:
        raise ValueError("its tensors' offsets do not cover the data exactly")
    return tensors


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """The bytes of a tensor of ``shape``, or ``limit`` + 1 once it is known to exceed
    ``limit`` (so that a hostile shape of a million dimensions is never multiplied out)."""
    if 0 in shape:
        return 0
    total = itemsize
    for n in shape:
        total *= n
        if total > limit:
            return limit + 1
    return total


def _header_entry(name: str, entry: object, data_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The meta-device tensor and the data span of one safetensors header entry (its data
    within ``data_size`` bytes: checked before any tensor is made); a ValueError naming the tensor and what is wrong with its entry."""
    what = f"tensor {name[:80]!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{what} is not an entry with a dtype, a shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{what} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"{what} has a malformed shape or offsets")
    if not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
        raise ValueError(f"{what} has a malformed shape or offsets")
    if offsets[1] - offsets[0] != _nbytes(shape, SAFETENSORS_DTYPES[dtype].itemsize, data_size):
        raise ValueError(f"{what} has offsets that do not match its shape")
    if offsets[1] > data_size:
        raise ValueError(f"{what} has offsets beyond the end of the file")
    return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta"), (offsets[0], offsets[1])


# the wrapper keys timm's load_state_dict unwraps (EMA weights first), and the prefixes of
# DistributedDataParallel and torch.compile that clean_state_dict strips
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NOT_A_STATE_DICT = (
    "pass the model's state_dict (a flat mapping of names to tensors), saved with safetensors or torch.save."
)


def _load_torch(path: Path) -> object:
    """Whatever a PyTorch file holds, read with ``weights_only=True`` (memory-mapped when
    the file is in the zip format); a CheckpointError for anything unreadable or unsafe."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError) as exc:
        if "Unsupported global" not in str(exc):
            raise CheckpointError(
                f"Checkpoint {str(path)!r} is not a readable PyTorch file ({_first_line(exc)}). "
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
    except Exception as exc:  # noqa: BLE001 - EOFError, OSError, ValueError, ...: all mean unreadable
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable PyTorch file ({_first_line(exc)}). "
            "Pass a .safetensors file or a .pth/.pt/.bin state_dict."
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else "") or type(exc).__name__


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if obj is None:
        return "None"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def unwrap_state_dict(obj: object, path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The flat ``str -> Tensor`` state_dict in ``obj``: unwrapped from a training wrapper
    (``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model``, as timm does) and
    stripped of a ``module.``/``_orig_mod.`` prefix; a CheckpointError for anything else.
    ``meta``: the tensors are a header's (meta device, shapes only), which is allowed."""
    what = f"Checkpoint {str(path)!r}"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} holds {_describe(obj)}, not a state_dict; {NOT_A_STATE_DICT}")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    keys = [k for k in obj if not isinstance(k, str)]
    if keys:
        raise CheckpointError(
            f"{what} is a mapping with non-string keys (e.g. {str(keys[0])[:40]!r}), not a state_dict; "
            + NOT_A_STATE_DICT
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{what} is not a flat state_dict of tensors ({bad[0][:80]!r} holds {_describe(obj[bad[0]])}); "
            + NOT_A_STATE_DICT
        )
    if not obj:
        raise CheckpointError(f"{what} holds no tensors; {NOT_A_STATE_DICT}")
    state = {}
    for key, tensor in obj.items():
        name = key
        for prefix in PREFIXES:
            name = name[len(prefix) :] if name.startswith(prefix) else name
        if name in state:
            raise CheckpointError(
                f"{what} holds {name!r} twice (with and without a prefix); {NOT_A_STATE_DICT}"
            )
        state[name] = tensor
    check_tensors(state, what, meta)
    return state


def check_tensors(state: dict[str, torch.Tensor], what: str, meta: bool = False) -> None:
    """Refuse sparse, quantized or complex tensors, tensors on the meta device (unless
    ``meta``), and floating tensors of mixed dtypes (a model takes one floating dtype; fp16,
    bf16, fp32 and fp64 are all kept as they are)."""
    odd = [
        k
        for k, t in state.items()
        if t.layout != torch.strided or t.is_quantized or t.is_complex() or (t.is_meta and not meta)
        or (t.is_floating_point() and t.dtype not in FLOAT_DTYPES)
    ]  # fmt: skip
    if odd:
        t = state[odd[0]]
        raise CheckpointError(
            f"{what}: tensor {odd[0][:80]!r} is {t.dtype} with layout {t.layout}, which a model's weights "
            "cannot be; " + NOT_A_STATE_DICT
        )
    floats = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    if len(floats) > 1:
        raise CheckpointError(
            f"{what} mixes floating dtypes ({', '.join(floats)}); a model runs in one. Convert every "
            "tensor to one dtype (e.g. {k: v.float() for k, v in state.items()}) and save it again."
        )


def read_state_dict(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint file, unwrapped from common training wrappers;
    the file is read once. ``shapes_only``: of a safetensors file, only the header is read,
    and the tensors are empty ones on the meta device (dtype and shape, for checking keys)."""
    path = Path(path)
    stat_input(path, "Checkpoint", CheckpointError)
    if path.is_dir() or not path.is_file():
        read_safetensors(path)  # the error for a folder or a missing file
    if path.suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(_load_torch(path), path)
    if shapes_only:
        return unwrap_state_dict(read_safetensors_header(path), path, meta=True)
    return unwrap_state_dict(read_safetensors(path)[0], path)


def pretrained_file(model_name: str, param: str = "checkpoint") -> tuple[Path, str]:
    """The local file of timm's pretrained weights for ``model_name``, from the Hugging Face
    cache (downloading only when the network allows); and a description of the source.
    ``param`` names the parameter that takes a local file instead, for the error messages."""
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .models import TORCHVISION, create_model, resolve_name

    resolved = resolve_name(model_name)
    if resolved.library == TORCHVISION:
        return torchvision_cached_file(resolved.arch, param)
    local = f"`{param}=FILE`"
    cfg = create_model(model_name, meta=True).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise CheckpointError(
            f"timm has no Hugging Face weights for {model_name!r} (its pretrained config names no "
            f"hf_hub_id). Download the weights yourself and pass them with {local}."
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
        f"(e.g. `hf download {hub_id}`) and copy the cache, or pass a local file with {local}."
    )


def torchvision_cached_file(arch: str, param: str = "checkpoint") -> tuple[Path, str]:
    """The torch hub cache file (``$TORCH_HOME/hub/checkpoints``) of torchvision builder
    ``arch``'s default weights, and a description of it; never the network: a CheckpointError
    naming the expected path where it is absent."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        weights = None
    if weights is None:
        raise CheckpointError(
            f"torchvision has no pretrained weights for {arch!r}. Pass a local state_dict with `{param}=FILE`."
        )
    filename = os.path.basename(urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise CheckpointError(
            f"The pretrained weights of torchvision:{arch} ({weights}) are not in the torch hub cache: "
            f"expected {str(path)!r}. eca-surgery never downloads them; put the file there (e.g. copy "
            f"{weights.url} fetched where you have a network) or pass a local state_dict with `{param}=FILE`."
        )
    return path, f"torchvision pretrained {weights} ({path})"
