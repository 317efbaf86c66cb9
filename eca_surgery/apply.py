"""Carry out a plan: put each edit's ECA block into the model, in place.

Replacements and filled attention slots take the old module's attribute. An ECA
inserted after (before) module ``P`` goes where the plan's ``eca_path`` says:

* ``P.eca`` (``P.eca_before``) in a plain ``nn.Sequential`` ``P``: its last (first) element;
* ``P.eca`` (``P.eca_before``) in any other module: run from a forward hook (pre-hook)
  on ``P``, so it runs whatever ``P``'s own ``forward`` does;
* ``Q.NAME_eca`` (``Q.NAME_eca_before``) where ``P = Q.NAME`` runs every child it holds
  (RegNet's RegStage, DenseNet's DenseBlock): the element right after (before) ``P``
  when ``Q`` is a plain Sequential, else a child of ``Q`` run by a hook on ``P``.

Either way every original state_dict key and tensor is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .detect import qualified_name
from .eca import make_eca
from .edits import Edit, Position
from .errors import SurgeryError
from .locate import ATTN_SLOTS, is_empty_slot, is_plain_sequential, runs_own_children
from .plan import Plan


def _run_after(eca: nn.Module, module: nn.Module, args, output):
    return eca(output)


def _run_before(eca: nn.Module, module: nn.Module, args):
    return (eca(args[0]), *args[1:])


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    New ECA weights get PyTorch's default Conv1d initialisation, on the device and in
    the dtype of the model's weights (nothing is allocated on the meta device). A plan
    that does not fit the model is refused before anything is changed (see
    :func:`check_applicable`).
    """
    check_applicable(model, plan)
    ref = next(model.parameters())
    for edit in plan.edits:
        eca = make_eca(
            edit.channels, kernel_size=edit.kernel_size, gate=edit.gate, device=ref.device, dtype=ref.dtype
        )
        eca.train(model.training)
        if edit.position == Position.IN_PLACE:
            model.set_submodule(edit.path, eca, strict=True)
        elif edit.position == Position.SLOT:
            parent_path, _, name = edit.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            delattr(parent, name)  # the slot may hold None (a plain attribute) or an nn.Identity
            parent.add_module(name, eca)
        else:
            _insert(model, edit, eca)
    return model


@dataclass(frozen=True)
class Misfit:
    """An edit that does not fit a model, and why: ``reason`` is a clause such as
    ``"it is timm.layers.eca.EcaModule, not timm.layers.squeeze_excite.SEModule"`` (about the
    module at the edit's path)."""

    edit: Edit
    index: int
    reason: str


class PlanMisfit(SurgeryError):
    """A plan that does not fit the model it is applied to; ``misfit`` says where and why,
    so a caller (such as a checkpoint loader) can word it for its own input."""

    def __init__(self, misfit: Misfit) -> None:
        super().__init__(
            f"apply_plan: the plan does not fit this model at {misfit.edit.path!r}: {misfit.reason}. The "
            "plan was made for another model, or was already applied to this one; nothing was changed. "
            "Make the plan on the model it is applied to, with make_plan, and apply it once."
        )
        self.misfit = misfit


def check_applicable(model: nn.Module, plan: Plan) -> None:
    """Refuse, before anything is changed, a plan that does not fit ``model`` (see
    :func:`find_misfit`): one made for another model, or applied to it already."""
    misfit = find_misfit(model, plan.edits)
    if misfit is not None:
        raise PlanMisfit(misfit)


def find_misfit(model: nn.Module, edits: Iterable[Edit]) -> Misfit | None:
    """The first of ``edits`` that does not fit ``model`` as it is now, or None.

    A replacement needs a module of the class it replaced at its path; a slot edit an empty
    attention slot (None or nn.Identity); an insertion its module, and a free ``eca_path`` in
    that module or its parent. No two edits may put an ECA block at one path.
    """
    edits = list(edits)
    replaced = {e.path for e in edits if not e.position.inserts}
    taken: set[str] = set()
    for index, edit in enumerate(edits):
        if edit.eca_path in taken:
            return Misfit(edit, index, f"a second edit puts an ECA block at {edit.eca_path!r}")
        taken.add(edit.eca_path)
        inside = _inside(edit.path, replaced)
        if inside is not None:
            return Misfit(edit, index, f"it lies inside {inside[:200]!r}, which another edit replaces")
        if edit.position == Position.IN_PLACE:
            reason = _replace_misfit(model, edit)
        elif edit.position == Position.SLOT:
            reason = _slot_misfit(model, edit)
        else:
            reason = _insert_misfit(model, edit)
        if reason is not None:
            return Misfit(edit, index, reason)
    return None


def _inside(path: str, replaced: set[str]) -> str | None:
    """The first module of ``replaced`` that holds ``path`` (its edit would act inside a
    module that another edit takes out), or None."""
    parts = path.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in replaced), None)


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _replace_misfit(model: nn.Module, edit: Edit) -> str | None:
    target = _module(model, edit.path)
    if target is None:
        return "there is no module there"
    found = qualified_name(type(target))
    return None if found == edit.old_class else f"it is {found}, not {edit.old_class}"


def _slot_misfit(model: nn.Module, edit: Edit) -> str | None:
    parent_path, _, name = edit.path.rpartition(".")
    parent = _module(model, parent_path)
    if parent is None:
        return f"there is no module {parent_path!r}"
    if name not in ATTN_SLOTS:  # only where timm's blocks keep attention; never e.g. a None downsample
        return f"{name!r} is not an attention slot (one of: {', '.join(ATTN_SLOTS)})"
    if is_empty_slot(parent, name):
        return None
    if not hasattr(parent, name):
        return f"{parent_path or 'the model'} has no attention slot {name!r}"
    return f"the slot is not empty: it holds {qualified_name(type(getattr(parent, name)))}"


def _insert_misfit(model: nn.Module, edit: Edit) -> str | None:
    if _module(model, edit.path) is None:
        return "there is no module there"
    owner_path, _, name = edit.eca_path.rpartition(".")
    if owner_path not in (edit.path, edit.path.rpartition(".")[0]):
        return f"its ECA path {edit.eca_path!r} is in neither the module nor its parent"
    owner = model.get_submodule(owner_path)
    if runs_own_children(owner) and not is_plain_sequential(owner):
        return f"{owner_path or 'the model'!r} runs every child it holds, so its ECA block would run twice"
    if hasattr(owner, name):
        return f"{edit.eca_path!r} is taken already"
    return None


def _insert(model: nn.Module, edit: Edit, eca: nn.Module) -> None:
    owner_path, _, name = edit.eca_path.rpartition(".")
    owner = model.get_submodule(owner_path)
    after = edit.position == Position.AFTER
    if is_plain_sequential(owner):
        anchor = None if owner_path == edit.path else edit.path.rpartition(".")[2]
        _add_in_order(owner, name, eca, anchor, after)
        return
    owner.add_module(name, eca)
    target = model.get_submodule(edit.path)
    if after:
        target.register_forward_hook(partial(_run_after, eca))
    else:
        target.register_forward_pre_hook(partial(_run_before, eca))


def _add_in_order(seq: nn.Sequential, name: str, module: nn.Module, anchor: str | None, after: bool) -> None:
    """Add ``module`` to ``seq`` right after (before) child ``anchor``, or at the end (start)."""
    children = list(seq._modules.items())
    keys = [k for k, _ in children]
    at = (len(keys) if after else 0) if anchor is None else keys.index(anchor) + (1 if after else 0)
    seq._modules.clear()
    seq._modules.update(children[:at])
    seq.add_module(name, module)
    seq._modules.update(children[at:])


def count_eca_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How many times each ECA block of ``model`` runs in one forward pass on ``x``."""
    from timm.layers import EcaModule

    counts: dict[str, int] = {}
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, EcaModule):
            counts[path] = 0
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, path=path: counts.__setitem__(path, counts[path] + 1)
                )
            )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts
