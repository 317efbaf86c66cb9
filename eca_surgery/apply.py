"""Carry out a plan: put each edit's new module into the model, in place."""

from __future__ import annotations

from torch import nn

from .detect import qualified_name
from .eca import make_eca
from .plan import Plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    Each replaced module is swapped at its own attribute path, so every other
    state_dict key and tensor stays as it was. New ECA weights get PyTorch's default
    Conv1d initialisation on the device and dtype of the module they replace (no
    allocation on the meta device).
    """
    for edit in plan.edits:
        old = model.get_submodule(edit.path)
        if qualified_name(type(old)) != edit.old_class:
            raise RuntimeError(
                f"plan does not fit the model: {edit.path} is {qualified_name(type(old))}, "
                f"the plan expected {edit.old_class}"
            )
        ref = next(old.parameters(), None)
        eca = make_eca(
            edit.channels,
            kernel_size=edit.kernel_size,
            gate=edit.gate,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        eca.train(old.training)
        model.set_submodule(edit.path, eca, strict=True)
    return model
