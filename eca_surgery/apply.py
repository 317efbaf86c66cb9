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

from functools import partial

import torch
from torch import nn

from .detect import qualified_name
from .eca import make_eca
from .errors import SurgeryError
from .locate import is_plain_sequential
from .plan import Edit, Plan


def _run_after(eca: nn.Module, module: nn.Module, args, output):
    return eca(output)


def _run_before(eca: nn.Module, module: nn.Module, args):
    return (eca(args[0]), *args[1:])


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    New ECA weights get PyTorch's default Conv1d initialisation, on the device and in
    the dtype of the model's weights (nothing is allocated on the meta device).
    """
    check_applicable(model, plan)
    ref = next(model.parameters())
    for edit in plan.edits:
        eca = make_eca(
            edit.channels, kernel_size=edit.kernel_size, gate=edit.gate, device=ref.device, dtype=ref.dtype
        )
        eca.train(model.training)
        if edit.position == "in-place":
            _check_class(model, edit)
            model.set_submodule(edit.path, eca, strict=True)
        elif edit.position == "slot":
            parent_path, _, name = edit.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            delattr(parent, name)  # the slot may hold None (a plain attribute) or an nn.Identity
            parent.add_module(name, eca)
        else:
            _insert(model, edit, eca)
    return model


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def check_applicable(model: nn.Module, plan: Plan) -> None:
    """Refuse, before anything is changed, a ``plan`` that was made for another model or was
    already applied to this one (a second insert would run two ECA blocks in a row)."""
    for edit in plan.edits:
        target = _module(model, edit.path)
        if edit.position == "in-place":
            found = None if target is None else qualified_name(type(target))
            ok = found == edit.old_class
        elif edit.position == "slot":
            parent = _module(model, edit.path.rpartition(".")[0])
            ok = parent is not None and (target is None or type(target) is nn.Identity)
        else:
            ok = target is not None and _module(model, edit.eca_path) is None
        if not ok:
            raise SurgeryError(
                f"apply_plan: the plan does not fit this model at {edit.path!r} (the plan was made for another "
                "model, or was already applied to this one); nothing was changed. Make the plan on the "
                "model it is applied to, with make_plan, and apply it once."
            )


def _check_class(model: nn.Module, edit: Edit) -> None:
    old = model.get_submodule(edit.path)
    if qualified_name(type(old)) != edit.old_class:
        raise RuntimeError(
            f"plan does not fit the model: {edit.path} is {qualified_name(type(old))}, "
            f"the plan expected {edit.old_class}"
        )


def _insert(model: nn.Module, edit: Edit, eca: nn.Module) -> None:
    owner_path, _, name = edit.eca_path.rpartition(".")
    owner = model.get_submodule(owner_path)
    after = edit.position == "after"
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
