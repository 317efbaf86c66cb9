"""Patched-model checkpoints: safetensors weights plus the metadata that rebuilds the architecture.

The metadata (all strings, as safetensors requires) records the source timm model
name and kwargs, the recipe, the parameter counts and the versions that wrote the
file. ``load_patched`` rebuilds the source architecture on the meta device, re-applies
the recipe and loads the weights strictly by assignment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .jsontext import loads_strict
from .models import (
    check_fits,
    check_kinds,
    check_model_kwargs,
    create_model,
    load_into,
    loadable,
    shapes_of,
)
from .outputs import atomic_write_file, check_file_output, current_umask  # noqa: F401
from .plan import Plan, make_plan
from .recipe import Recipe, recipe_from_dict
from .weights import check_tensors, read_safetensors

FORMAT = "eca-surgery"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Provenance:
    """Where a patched checkpoint's weights came from and how its new weights were made:
    the source weights, the timm-native variant (if timm builds the model itself), the
    ``init`` record and, once healed, the ``heal`` record."""

    source: str = ""
    native: dict[str, Any] | None = None
    init: dict[str, Any] = field(default_factory=lambda: {"method": "default"})
    heal: dict[str, Any] | None = None


@dataclass(frozen=True)
class Versions:
    """The versions of eca-surgery, timm and torch that wrote a checkpoint (None: not recorded)."""

    eca_surgery: str | None = None
    timm: str | None = None
    torch: str | None = None

    @classmethod
    def current(cls) -> Versions:
        import timm

        from . import __version__

        return cls(__version__, timm.__version__, torch.__version__)


@dataclass(frozen=True)
class CheckpointRecord:
    """What a patched checkpoint says of itself: the source model and its kwargs, the plan
    (the recipe and the edits it made), the provenance, and the versions that wrote it."""

    model: str
    model_kwargs: dict[str, Any]
    plan: Plan
    provenance: Provenance = field(default_factory=Provenance)
    versions: Versions = field(default_factory=Versions)

    @classmethod
    def of(
        cls, plan: Plan, model_kwargs: dict[str, Any], provenance: Provenance | None = None
    ) -> CheckpointRecord:
        """The record of a model converted by ``plan``, to be written now (current versions)."""
        return cls(plan.model, dict(model_kwargs), plan, provenance or Provenance(), Versions.current())

    def to_metadata(self) -> dict[str, str]:
        """The record as safetensors metadata (all strings)."""
        return make_metadata(
            self.plan,
            self.model_kwargs,
            self.provenance.source,
            self.provenance.native,
            self.provenance.init,
            self.provenance.heal,
        )

    def with_heal(self, heal: dict[str, Any]) -> CheckpointRecord:
        """This record with ``heal`` as its heal record, written with the current versions."""
        return replace(self, provenance=replace(self.provenance, heal=heal), versions=Versions.current())


@dataclass
class Patched:
    """A patched model rebuilt from a checkpoint, with what the checkpoint says of it."""

    model: nn.Module
    record: CheckpointRecord
    metadata: dict[str, str]

    @property
    def plan(self) -> Plan:
        return self.record.plan

    @property
    def model_name(self) -> str:
        return self.record.model

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return self.record.model_kwargs


def make_metadata(
    plan: Plan,
    model_kwargs: dict[str, Any],
    source: str,
    native: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
    heal: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata of a patched checkpoint; ``init`` and ``heal`` say how its new
    weights were started and trained, when they were."""
    import timm

    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": plan.model,
        "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
        "recipe": plan.recipe.to_json(),
        "source_weights": source,
        "timm_native": json.dumps(native, sort_keys=True),
        "init": json.dumps(init or {"method": "default"}, sort_keys=True),
        **({"heal": json.dumps(heal, sort_keys=True)} if heal is not None else {}),
        "params_before": str(plan.params_before),
        "params_after": str(plan.params_after),
        "eca_surgery_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }


def check_output(path: str | Path, force: bool, size: int | None = None) -> Path:
    """Refuse an output path that exists (without ``force``), that is not a regular file,
    or whose folder does not exist, is not writable or (``size`` bytes) has not the space."""
    return check_file_output(path, force, size)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The bytes the tensors take in a safetensors file (without its small header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint(
    model: nn.Module, path: str | Path, record: CheckpointRecord, force: bool = False
) -> Path:
    """Write ``model``'s state_dict with ``record`` as metadata to ``path`` atomically,
    after checking that the record rebuilds exactly these tensors."""
    tensors = _unshared(model.state_dict())
    check_rebuildable(tensors, record.plan, record.model_kwargs)
    metadata = record.to_metadata()
    return atomic_write_file(
        path, lambda tmp: save_safetensors(tensors, tmp, metadata), force, tensor_bytes(tensors)
    )


def save_patched(
    model: nn.Module,
    path: str | Path,
    plan: Plan,
    *,
    model_kwargs: dict[str, Any] | None = None,
    source: str = "",
    native: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
    heal: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``model``'s state_dict with rebuild metadata to ``path`` atomically.

    The file is written to a temporary name beside ``path``, fsynced and renamed into
    place (see ``eca_surgery.outputs``), so an interrupted or failed write never leaves a
    partial checkpoint and never damages the old one; a replaced file keeps its mode.
    """
    provenance = Provenance(source, native, init or {"method": "default"}, heal)
    return write_checkpoint(model, path, CheckpointRecord.of(plan, model_kwargs or {}, provenance), force)


def check_rebuildable(tensors: dict[str, torch.Tensor], plan: Plan, model_kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is written, to save ``tensors`` with metadata that would not
    rebuild them: ``plan``'s model built with ``model_kwargs`` and patched by its recipe
    must have exactly these keys and shapes, as ``load_patched`` will require."""
    from .apply import apply_plan

    check_model_kwargs(model_kwargs, "model_kwargs", CheckpointError)
    rebuilt = create_model(plan.model, meta=True, **model_kwargs)
    apply_plan(rebuilt, make_plan(rebuilt, plan.recipe, plan.model))
    try:
        check_fits(rebuilt, shapes_of(tensors), "The model to save", f"{plan.model} patched by its recipe")
        check_kinds(rebuilt, tensors, "The model to save")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} Nothing was written: the file could not be loaded again. Save the model together "
            "with the plan it was converted by and the model kwargs it was built with (e.g. "
            "save_patched(result.model, path, result.plan, model_kwargs=result.model_kwargs))."
        ) from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, with its I/O errors (ENOSPC, EIO, ...) raised as OSError."""
    from safetensors.torch import save_file

    with safetensors_io_errors():
        save_file(tensors, str(path), metadata=metadata)


@contextmanager
def safetensors_io_errors() -> Iterator[None]:
    """Re-raise safetensors' I/O errors (a ``SafetensorError`` quoting the OS error code)
    as OSError, so that the writers in ``outputs`` report them as clean errors."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        code = re.search(r"code: (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from exc


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage, as safetensors requires; keys unchanged."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = tensor.contiguous()
    return out


def read_metadata(metadata: dict[str, str], path: str | Path) -> tuple[str, dict[str, Any], Recipe]:
    """Model name, kwargs and recipe from a checkpoint's metadata; error if it is not ours."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but was not written by eca-surgery "
            "(its metadata has no 'format: eca-surgery'), so the patched architecture cannot "
            "be rebuilt from it. Pass a file written by `eca-surgery convert`."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} uses checkpoint format version {metadata.get('format_version')!r}; "
            f"this eca-surgery reads version {FORMAT_VERSION}. Upgrade eca-surgery."
        )
    try:
        name, kwargs, recipe = (
            metadata["model"],
            loads_strict(metadata["model_kwargs"]),
            loads_strict(metadata["recipe"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} has damaged eca-surgery metadata ({type(exc).__name__}: {str(exc)[:100]}); "
            "re-export it."
        ) from None
    if not isinstance(name, str) or not name or ":" in name:
        raise CheckpointError(
            f"{str(path)!r} names the model {str(name)[:60]!r} in its metadata, which is not a timm model "
            "name; re-export it."
        )
    check_model_kwargs(kwargs, f"{str(path)!r} metadata", CheckpointError)
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"{str(path)!r} has damaged eca-surgery metadata (its recipe is not an object); re-export it."
        )
    return name, kwargs, recipe_from_dict(recipe, source=f"{path} metadata")


def open_patched(path: str | Path) -> Patched:
    """Rebuild the patched model stored in ``path`` and load its weights strictly."""
    from .apply import apply_plan

    tensors, metadata = read_safetensors(path, "Pass a checkpoint written by `eca-surgery convert`.")
    name, kwargs, recipe = read_metadata(metadata, path)
    what = f"Checkpoint {str(path)!r}"
    check_tensors(tensors, what)
    model = loadable(create_model(name, meta=True, **kwargs), name, **kwargs)
    plan = make_plan(model, recipe, name)
    apply_plan(model, plan)
    check_fits(model, shapes_of(tensors), what, f"{name} patched by its recipe")
    check_kinds(model, tensors, what)
    load_into(model, tensors)
    model.eval()
    record = CheckpointRecord(name, kwargs, plan, _provenance(metadata), _versions(metadata))
    return Patched(model, record, metadata)


def _json_record(metadata: dict[str, str], key: str, default: Any) -> Any:
    """The JSON object stored under ``key`` (a record kept along, not needed to rebuild the
    model), or ``default`` where it is missing or damaged."""
    try:
        value = loads_strict(metadata[key])
    except (KeyError, TypeError, ValueError):
        return default
    return value if isinstance(value, dict) else default


def _provenance(metadata: dict[str, str]) -> Provenance:
    source = metadata.get("source_weights", "")
    return Provenance(
        source if isinstance(source, str) else "",
        _json_record(metadata, "timm_native", None),
        _json_record(metadata, "init", {"method": "default"}),
        _json_record(metadata, "heal", None),
    )


def _versions(metadata: dict[str, str]) -> Versions:
    return Versions(*(metadata.get(f"{k}_version") for k in ("eca_surgery", "timm", "torch")))


def load_patched(path: str | Path) -> nn.Module:
    """The patched model stored in ``path``, weights loaded strictly, in eval mode."""
    return open_patched(path).model
