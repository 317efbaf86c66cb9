"""Patched-model checkpoints: safetensors weights plus the record that rebuilds the architecture.

The metadata (all strings, as safetensors requires) is a :class:`CheckpointRecord`: the
source model's name (a timm name, ``torchvision:NAME``, or ``module:CLASS``) and kwargs, the recipe and the edits it resolved to, the
provenance of the weights and the versions that wrote the file. Format 2 stores the
edits themselves, so ``load_patched`` rebuilds the source architecture on the meta
device, applies the stored edits (no probing, no planning: a file loads whatever
today's planner would choose) and loads the weights strictly by assignment. Format 1
files stored the recipe only; they are still read, by planning the recipe again.

Everything read from a file is treated as hostile: every field is parsed strictly,
typed and bounded, and anything damaged is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .choices import DType, choice
from .edits import Edit
from .errors import CheckpointError, SurgeryError, summary
from .jsontext import loads_strict
from .models import (
    MODULE_PREFIX,
    TIMM,
    check_has_data,
    check_matches,
    check_model_kwargs,
    create_model,
    has_only_persistent_state,
    load_into,
    loadable,
    meta_copy,
    resolve_name,
    shapes_of,
)
from .outputs import Meanwhile, atomic_write_file
from .plan import Plan, make_plan
from .recipe import Recipe, recipe_from_dict
from .weights import check_tensors, read_safetensors

if TYPE_CHECKING:
    from .apply import Misfit

FORMAT = "eca-surgery"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
MAX_EDITS = 10_000  # far more than any timm model has places for ECA
MAX_DIGITS = 15  # of a parameter count
MAX_SOURCE = 4096
# a class's qualified name as a "module:" file records it: only ever compared, never imported
CLASS_NAME = re.compile(r"[A-Za-z_][\w]*(\.(<locals>|[A-Za-z_]\w*))*", re.ASCII)
MAX_CLASS_NAME = 300


class ModuleNeeded(CheckpointError):
    """A checkpoint of a model converted from a module object (``class_name``), opened
    without ``model=``."""

    def __init__(self, message: str, class_name: str) -> None:
        super().__init__(message)
        self.class_name = class_name


@dataclass(frozen=True)
class Provenance:
    """Where a patched checkpoint's weights came from and how its new weights were made:
    the source weights, the timm-native variant (if timm builds the model itself), the
    ``init`` record and, once healed, the ``heal`` record."""

    source: str = ""
    native: dict[str, Any] | None = None
    init: dict[str, Any] = field(default_factory=lambda: {"method": "default"})
    heal: dict[str, Any] | None = None

    def to_metadata(self) -> dict[str, str]:
        """The provenance as metadata entries (a ``heal`` entry only once healed)."""
        heal = {"heal": _json(self.heal)} if self.heal is not None else {}
        return {
            "source_weights": self.source,
            "timm_native": _json(self.native),
            "init": _json(self.init),
            **heal,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], strict: bool = True) -> Provenance:
        """The provenance in ``metadata``; ValueError for a damaged entry, unless not ``strict``
        (format 1, where these were records kept along: a damaged one reads as missing)."""
        source = metadata.get("source_weights", "")
        if not isinstance(source, str) or len(source) > MAX_SOURCE:
            if strict:
                raise ValueError(f"its source_weights is not a path of at most {MAX_SOURCE} characters")
            source = ""
        return cls(
            source,
            _json_record(metadata, "timm_native", None, strict),
            _json_record(metadata, "init", {"method": "default"}, strict, required=strict),
            _json_record(metadata, "heal", None, strict),
        )


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

    def to_metadata(self) -> dict[str, str]:
        return {f"{k}_version": v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Versions:
        """The versions in ``metadata``; one that is not a short printable string reads as None
        (they are shown, never used)."""
        found = [metadata.get(f"{f.name}_version") for f in fields(cls)]
        return cls(*(v if isinstance(v, str) and len(v) <= 100 and v.isprintable() else None for v in found))


@dataclass(frozen=True)
class CheckpointRecord:
    """What a patched checkpoint says of itself: the source model and its kwargs, the plan
    (the recipe and the edits it made), the provenance, and the versions that wrote it.

    ``params_recorded`` is the parameter count the file records (None for a record not
    read from a file); it takes no part in comparisons."""

    model: str
    model_kwargs: dict[str, Any]
    plan: Plan
    provenance: Provenance = field(default_factory=Provenance)
    versions: Versions = field(default_factory=Versions)
    params_recorded: int | None = field(default=None, compare=False)
    dtype: str | None = None  # the one floating dtype of the file's tensors (None: mixed, or not recorded)

    @classmethod
    def of(
        cls,
        plan: Plan,
        model_kwargs: dict[str, Any],
        provenance: Provenance | None = None,
        by_name: bool = True,
    ) -> CheckpointRecord:
        """The record of a model converted by ``plan`` (``write_checkpoint`` stamps the versions);
        not ``by_name``: converted from a module object, recorded as ``module:`` and its class."""
        name = plan.model if by_name else MODULE_PREFIX + plan.model
        return cls(name, dict(model_kwargs), plan, provenance or Provenance())

    @property
    def by_name(self) -> bool:
        """Whether the model is rebuilt by its timm or torchvision name (else it needs a fresh build
        passed in)."""
        return not self.model.startswith(MODULE_PREFIX)

    def to_metadata(self) -> dict[str, str]:
        """The record as format-2 safetensors metadata (all strings): the one place it is written."""
        plan = self.plan
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_kwargs": _json(self.model_kwargs),
            "recipe": plan.recipe.to_json(),
            "edits": _json([e.to_dict() for e in plan.edits]),
            "rule_matches": _json(list(plan.rule_matches)),
            "params_before": str(plan.params_before),
            "params_after": str(plan.params_after),
            **self.provenance.to_metadata(),
            **self.versions.to_metadata(),
            **({"dtype": self.dtype} if self.dtype is not None else {}),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path: str | Path) -> CheckpointRecord:
        """The record in a checkpoint's ``metadata`` (of the file ``path``), checked as untrusted
        input: the one place metadata is read. A CheckpointError (a RecipeError for a bad
        recipe) names the file and the damage. Format 1 stored no edits: its plan comes from
        planning the recipe again on a meta-device build."""
        name, kwargs, recipe = read_metadata(metadata, path)
        if metadata["format_version"] == "1":
            plan = make_plan(create_model(name, meta=True, **kwargs), recipe, name)
            provenance = Provenance.from_metadata(metadata, strict=False)
            return cls(name, kwargs, plan, provenance, Versions.from_metadata(metadata), _recorded(metadata))
        try:
            plan = _stored_plan(metadata, name.removeprefix(MODULE_PREFIX), recipe)
            provenance = Provenance.from_metadata(metadata)
            dtype = _dtype(metadata)
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(path, exc) from None
        versions = Versions.from_metadata(metadata)
        return cls(name, kwargs, plan, provenance, versions, plan.params_after, dtype)

    def with_heal(self, heal: dict[str, Any]) -> CheckpointRecord:
        """This record with ``heal`` as its heal record."""
        return replace(self, provenance=replace(self.provenance, heal=heal))


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


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _dtype(metadata: dict[str, str]) -> str | None:
    """The recorded dtype (files before 0.3.0 record none); ValueError for an unknown one."""
    dtype = metadata.get("dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"its dtype is {str(dtype)[:40]!r}, not one of {', '.join(FLOAT_DTYPES)}")
    return dtype


def uniform_dtype(tensors: dict[str, torch.Tensor]) -> str | None:
    """The one floating dtype of ``tensors`` (e.g. ``float16``), or None if they mix several."""
    found = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    return found.pop() if len(found) == 1 and found <= set(FLOAT_DTYPES) else None


def check_dtype(record: CheckpointRecord, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError unless every floating tensor in the file has the recorded dtype."""
    if record.dtype is None:
        return
    other = [
        k for k, t in tensors.items() if t.is_floating_point() and str(t.dtype) != f"torch.{record.dtype}"
    ]
    if other:
        found = str(tensors[other[0]].dtype).removeprefix("torch.")
        raise CheckpointError(
            f"{what} records dtype {record.dtype}, but {len(other)} of its tensors are not (e.g. {other[0]}, "
            f"{found}): the file was changed after it was written. Convert the model again."
        )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _damaged(path: str | Path, exc: BaseException) -> CheckpointError:
    """The error for metadata that cannot be what eca-surgery wrote."""
    reason = f"no {exc.args[0]!r} entry" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return CheckpointError(
        f"{str(path)!r} has damaged eca-surgery metadata ({reason[:300]}), so the patched model cannot be "
        "rebuilt from it; re-export it (`eca-surgery convert`, or save_patched) from the source weights."
    )


def _json_record(
    metadata: dict[str, str], key: str, default: Any, strict: bool, required: bool = False
) -> Any:
    """The JSON object (or null) stored under ``key``; ``default`` where it is missing
    (ValueError if ``required``). A damaged one is a ValueError if ``strict``, else ``default``."""
    if key not in metadata:
        if required:
            raise KeyError(key)
        return default
    try:
        value = loads_strict(metadata[key])
    except (TypeError, ValueError):
        if strict:
            raise ValueError(f"its {key} record is not JSON") from None
        return default
    if value is None and default is None:
        return None
    if not isinstance(value, dict):
        if strict:
            raise ValueError(f"its {key} record is not a JSON object")
        return default
    return value


def read_metadata(metadata: dict[str, str], path: str | Path) -> tuple[str, dict[str, Any], Recipe]:
    """Model name, kwargs and recipe from a checkpoint's metadata; error if it is not ours."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but was not written by eca-surgery "
            "(its metadata has no 'format: eca-surgery'), so the patched architecture cannot "
            "be rebuilt from it. Pass a file written by `eca-surgery convert`."
        )
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{str(path)!r} uses checkpoint format version {str(metadata.get('format_version'))[:40]!r}; "
            f"this eca-surgery reads versions {' and '.join(READABLE_VERSIONS)}. Upgrade eca-surgery."
        )
    try:
        name, kwargs, recipe = (
            metadata["model"],
            loads_strict(metadata["model_kwargs"]),
            loads_strict(metadata["recipe"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, exc) from None
    name = _check_name(name, metadata["format_version"], path)
    check_model_kwargs(kwargs, f"{str(path)!r} metadata", CheckpointError, library=_library(name))
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"{str(path)!r} has damaged eca-surgery metadata (its recipe is not an object); re-export it."
        )
    return name, kwargs, recipe_from_dict(recipe, source=f"{path} metadata")


def _check_name(name: Any, version: str, path: str | Path) -> str:
    """The recorded model as eca-surgery names it (``timm:NAME`` read as the bare name); refuse
    one that is neither a timm name, nor (format 2) ``torchvision:`` and a builder in
    torchvision's registry or ``module:`` and a class's qualified name. Nothing here is ever
    imported: a class name is only compared, a torchvision name only looked up in its registry."""
    if isinstance(name, str) and name.startswith(MODULE_PREFIX) and version != "1":
        qualified = name.removeprefix(MODULE_PREFIX)
        if len(qualified) <= MAX_CLASS_NAME and CLASS_NAME.fullmatch(qualified):
            return name
    elif isinstance(name, str) and name and len(name) <= MAX_CLASS_NAME:
        try:
            resolved = resolve_name(name)
        except SurgeryError:
            resolved = None
        if resolved is not None and (resolved.library == TIMM or version != "1"):
            return resolved.full
    raise CheckpointError(
        f"{str(path)!r} names the model {str(name)[:60]!r} in its metadata, which is not a timm model "
        "name nor torchvision:NAME with a builder of torchvision.models.list_models(); re-export it."
    )


def _library(name: str) -> str:
    """The library whose kwargs a recorded model takes (timm's for a ``module:`` one, which has none)."""
    return TIMM if name.startswith(MODULE_PREFIX) else resolve_name(name).library


def _stored_plan(metadata: dict[str, str], name: str, recipe: Recipe) -> Plan:
    """The plan a format-2 file stores (its edits, rule match counts and parameter counts),
    checked against itself and its recipe; ValueError (or KeyError) for anything damaged."""
    edits = _edits(loads_strict(metadata["edits"]))
    matches = loads_strict(metadata["rule_matches"])
    if not isinstance(matches, list) or any(type(m) is not int for m in matches):
        raise ValueError("its rule_matches is not a list of integers")
    plan = Plan(name, recipe, edits, _count(metadata["params_before"], "params_before"), tuple(matches))
    _check_counts(plan, _count(metadata["params_after"], "params_after"))
    return plan


def _edits(data: Any) -> tuple[Edit, ...]:
    """The edits of a format-2 file, each checked by ``Edit.from_dict``."""
    if not isinstance(data, list):
        raise ValueError("its edits are not a list")
    if len(data) > MAX_EDITS:
        raise ValueError(f"it lists {len(data)} edits, more than the {MAX_EDITS} any model takes")
    edits = []
    for index, item in enumerate(data):
        try:
            edits.append(Edit.from_dict(item))
        except ValueError as exc:
            raise ValueError(f"edit {index}: {exc}") from None
    paths = [e.eca_path for e in edits]
    if len(set(paths)) != len(paths):
        raise ValueError(f"two edits put an ECA block at {next(p for p in paths if paths.count(p) > 1)!r}")
    return tuple(edits)


def _count(text: Any, key: str) -> int:
    """A parameter count written as plain decimal digits."""
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        raise ValueError(f"its {key} {str(text)[:40]!r} is not a parameter count")
    return int(text)


def _check_counts(plan: Plan, params_after: int) -> None:
    """ValueError unless each edit names a rule of the recipe with its action, the rule match
    counts count the edits, and the parameter counts add up."""
    rules = plan.recipe.rules
    counts = [0] * len(rules)
    for edit in plan.edits:
        if edit.rule >= len(rules) or rules[edit.rule].action != edit.action:
            raise ValueError(f"edit at {edit.path!r} names no {edit.action} rule {edit.rule} of its recipe")
        counts[edit.rule] += 1
    if tuple(counts) != plan.rule_matches:
        raise ValueError(
            f"its rule_matches {list(plan.rule_matches)[:20]} do not count its edits {counts[:20]}"
        )
    if plan.params_after != params_after:
        raise ValueError(
            f"its params_after {params_after} is not params_before less the removed and plus the added "
            f"parameters of its edits ({plan.params_after})"
        )


def _recorded(metadata: dict[str, str]) -> int | None:
    """The parameter count a format-1 file records, or None where it is missing or damaged."""
    try:
        return _count(metadata.get("params_after"), "params_after")
    except ValueError:
        return None


def rebuild(
    record: CheckpointRecord, what: str, meta: bool = False, model: nn.Module | None = None
) -> nn.Module:
    """``record``'s model patched by its edits, without planning: ``model`` (a fresh,
    unpatched build passed in, patched in place) or else timm's build by name with the
    recorded kwargs, on the meta device (``meta``) or ready to be filled by a state_dict
    (``models.loadable``). A CheckpointError names the first edit that does not fit."""
    from .apply import PlanMisfit, apply_plan

    built = _built(model is not None, record.model)
    if model is None:
        model = _build_by_name(record, what, meta)
    else:
        check_class(record, model, what)
    try:
        apply_plan(model, record.plan)
    except PlanMisfit as exc:
        raise _misfit_error(exc.misfit, record, what, built) from None
    except (SurgeryError, AttributeError, KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{what}: its edits cannot be applied to {record.model} {built} ({summary(exc)}). "
            f"{_refit_hint(record)}"
        ) from None
    return model


def _build_by_name(record: CheckpointRecord, what: str, meta: bool) -> nn.Module:
    """timm's build of ``record``'s model; a ModuleNeeded error for a model converted from an
    object, which is never built (nor imported) by name."""
    name, kwargs = record.model, record.model_kwargs
    if not record.by_name:
        cls = name.removeprefix(MODULE_PREFIX)
        raise ModuleNeeded(
            f"{what} holds a model converted from a module object ({cls}), which eca-surgery never "
            "builds or imports by name (a checkpoint names no code to run). Pass a freshly built, "
            f"unpatched model of that class: load_patched(path, model={cls.rsplit('.', 1)[-1]}()), or "
            "open_patched(path, model=...); the file's edits patch it and its weights load strictly.",
            cls,
        )
    model = create_model(name, meta=True, **kwargs)
    return model if meta else loadable(model, name, **kwargs)


def check_class(record: CheckpointRecord, model: nn.Module, what: str) -> None:
    """Refuse a ``model`` passed for a ``module:`` file whose class is not the recorded one."""
    from .detect import qualified_name

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, not {type(model).__name__}")
    recorded, passed = record.model.removeprefix(MODULE_PREFIX), qualified_name(type(model))
    if not record.by_name and passed != recorded:
        raise CheckpointError(
            f"{what} holds a {recorded} but `model` is a {passed}. Pass a freshly built, unpatched "
            f"{recorded.rsplit('.', 1)[-1]}."
        )


def _built(given: bool, name: str = "") -> str:
    """How the model the edits are applied to was made (``given``: passed in; else built by
    ``name``), for messages."""
    import timm
    import torchvision

    if given:
        return "as passed in `model`"
    if name.startswith("torchvision:"):
        return f"as this torchvision ({torchvision.__version__}) builds it"
    return f"as this timm ({timm.__version__}) builds it"


def _misfit_error(misfit: Misfit, record: CheckpointRecord, what: str, built: str) -> CheckpointError:
    """The error for stored edits that do not fit the rebuilt model: the first misfit, and
    the timm that wrote the file."""
    edit = misfit.edit
    return CheckpointError(
        f"{what} holds edits that do not fit {record.model} {built}: edit {misfit.index} "
        f"({edit.position.value} at {edit.path[:200]!r}): {misfit.reason}. {_refit_hint(record)}"
    )


def _refit_hint(record: CheckpointRecord) -> str:
    if not record.by_name:
        return (
            "Pass a freshly built, unpatched model of the class the file was saved from, with the "
            "architecture settings it was saved with."
        )
    if record.model.startswith("torchvision:"):
        return (
            f"The file was written with torch {record.versions.torch or '(unknown)'} and its torchvision: "
            "load it with those, or re-export it from the source weights with this torchvision."
        )
    return (
        f"The file was written with timm {record.versions.timm or '(unknown)'}: load it with that timm, or "
        "re-export it from the source weights with this one."
    )


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The bytes the tensors take in a safetensors file (without its small header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint(
    model: nn.Module,
    path: str | Path,
    record: CheckpointRecord,
    force: bool = False,
    original: nn.Module | None = None,
    dtype: DType | str | None = None,
    built: Mapping[str, tuple[int, ...]] | None = None,
    meanwhile: Meanwhile | None = None,
) -> Path:
    """Write ``model``'s state_dict with ``record`` (stamped with the current versions and
    the tensors' dtype) as metadata to ``path`` atomically, its floating tensors cast to
    ``dtype`` if given, after checking that the metadata rebuilds exactly these tensors
    (from ``original``, the unpatched module, for a ``module:`` record; ``built``: see
    :func:`check_rebuildable`). ``meanwhile`` runs as the file is written, which is kept
    only if it succeeds (see ``outputs.atomic_write_file``)."""
    tensors, metadata = checkpoint_contents(model, record, original, dtype, built)
    versions = [t._version for t in tensors.values()]

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp, metadata)

    def check_and_rewrite() -> None:  # a check that changed a tensor in place: write it again
        meanwhile.run()
        if [t._version for t in tensors.values()] != versions:
            stale.append(True)

    stale: list[bool] = []
    return atomic_write_file(
        path,
        write,
        force,
        tensor_bytes(tensors),
        meanwhile=None if meanwhile is None else Meanwhile(check_and_rewrite, meanwhile.stop),
        again=lambda: bool(stale),
    )


def checkpoint_contents(
    model: nn.Module,
    record: CheckpointRecord,
    original: nn.Module | None = None,
    dtype: DType | str | None = None,
    built: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`write_checkpoint` writes, checked (see there)."""
    state_dict = model.state_dict()
    check_has_data(state_dict, "The model to save")
    tensors = _unshared(state_dict)
    if dtype is not None:
        cast = getattr(torch, choice(DType, dtype, "dtype").value)
        tensors = {k: t.to(cast) if t.is_floating_point() else t for k, t in tensors.items()}
    record = replace(record, versions=Versions.current(), dtype=uniform_dtype(tensors))
    check_rebuildable(tensors, record, original, built)
    return tensors, record.to_metadata()


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
    original: nn.Module | None = None,
    built: Mapping[str, tuple[int, ...]] | None = None,
    meanwhile: Meanwhile | None = None,
) -> Path:
    """Write ``model``'s state_dict with rebuild metadata to ``path`` atomically.

    For a model converted from a module object, pass ``original``, the unpatched module
    (``Conversion.original``; any device, meta included): the file is then marked as not
    buildable by name and reloads with ``load_patched(path, model=...)``.

    The file is written to a temporary name beside ``path``, fsynced and renamed into
    place (see ``eca_surgery.outputs``), so an interrupted or failed write never leaves a
    partial checkpoint and never damages the old one; a replaced file keeps its mode.
    ``meanwhile`` (a check of the model, say) runs while the file is written, in another
    thread; the file is put in place only if it succeeds. ``built``: see ``check_rebuildable``.
    """
    provenance = Provenance(source, native, init or Provenance().init, heal)
    record = CheckpointRecord.of(plan, model_kwargs or {}, provenance, by_name=original is None)
    return write_checkpoint(model, path, record, force, original, built=built, meanwhile=meanwhile)


def check_rebuildable(
    tensors: dict[str, torch.Tensor],
    record: CheckpointRecord,
    original: nn.Module | None = None,
    built: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse, before anything is written, to save ``tensors`` with metadata that would not
    rebuild them: ``record`` written as metadata and read back, its model built with its
    kwargs (or, for a ``module:`` record, a meta-device copy of ``original``, the unpatched
    module) and patched by its edits, must have exactly these keys and shapes, as
    ``load_patched`` will require. ``built`` (key -> shape), from a caller that has just built
    ``record``'s model by name with these kwargs and patched it by this plan, stands for that
    build when the metadata reads back as the same model, kwargs and plan."""
    check_model_kwargs(record.model_kwargs, "model_kwargs", CheckpointError, library=_library(record.model))
    what = "The model to save"
    try:
        stored = CheckpointRecord.from_metadata(record.to_metadata(), "the metadata to write")
        if built is not None and _same_build(stored, record) and shapes_of(tensors) == dict(built):
            return
        fresh = meta_copy(original) if original is not None and not stored.by_name else None
        rebuilt = rebuild(stored, what, meta=True, model=fresh)
        check_matches(rebuilt, tensors, what, f"{record.model} patched by its edits")
    except SurgeryError as exc:  # a CheckpointError, or timm's unknown model name
        raise CheckpointError(
            f"{exc} Nothing was written: the file could not be loaded again. Save the model together "
            "with the plan it was converted by and the model kwargs it was built with (e.g. "
            "save_patched(result.model, path, result.plan, model_kwargs=result.model_kwargs), adding "
            "`original=result.original` for a model converted from a module object)."
        ) from None


def _same_build(stored: CheckpointRecord, record: CheckpointRecord) -> bool:
    """Whether ``stored`` (read back from metadata) builds by name what ``record`` describes."""
    return (
        stored.by_name
        and record.by_name
        and (stored.model, stored.model_kwargs, stored.plan)
        == (
            record.model,
            record.model_kwargs,
            record.plan,
        )
    )


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
        code = re.search(r"(?:code: |os error )(\d+)", str(exc))  # Debug or Display form of io::Error
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


def open_patched(path: str | Path, model: nn.Module | None = None) -> Patched:
    """Rebuild the patched model stored in ``path`` and load its weights strictly: the source
    model built on the meta device and patched by the file's edits (format 1: by its recipe,
    planned again), then filled by assignment.

    ``model``, a freshly built, unpatched model (any ``nn.Module``, a timm one included), is
    patched in place by the file's edits instead and filled by assignment where it is on the
    meta device, else by copy. A file saved from a module object (recorded as ``module:`` and
    its class) needs it, of the recorded class: nothing a file records is ever imported."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a fresh build), not {type(model).__name__}")
    tensors, metadata = read_safetensors(path, "Pass a checkpoint written by `eca-surgery convert`.")
    record = CheckpointRecord.from_metadata(metadata, path)
    what = f"Checkpoint {str(path)!r}"
    check_tensors(tensors, what)
    check_dtype(record, tensors, what)
    if model is not None and model_on_meta(model) and not has_only_persistent_state(model):
        raise CheckpointError(
            f"{what}: the `model` passed is on the meta device but has buffers a state_dict does not hold "
            "(non-persistent), which would stay empty. Build it on a real device (e.g. the CPU)."
        )
    model = rebuild(record, what, model=model)
    check_matches(model, tensors, what, f"{record.model} patched by its edits")
    load_into(model, tensors)
    if record.dtype is not None:  # a model passed in was filled by copy, in its own dtype
        model.to(getattr(torch, record.dtype))
    model.eval()
    return Patched(model, record, metadata)


def model_on_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def load_patched(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The patched model stored in ``path``, weights loaded strictly, in eval mode; ``model``
    (a freshly built, unpatched model, needed for a file saved from a module object) is
    patched and filled in place, see :func:`open_patched`."""
    return open_patched(path, model).model
