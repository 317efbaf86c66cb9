"""Resolve a recipe against a model into a plan: a plain, printable list of edits.

Planning reads the model (module tree and weight shapes, which may live on the meta
device) and never mutates it; ``apply.apply_plan`` carries the plan out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .detect import SEBlock, find_se_blocks
from .eca import eca_kernel_size
from .errors import RecipeError
from .recipe import Recipe, Rule

ECA_CLASS = "timm.layers.eca.EcaModule"
_ATTN_NAMES = {"se", "se_module", "attn", "attention"}
_GATE_NAMES = {"Sigmoid": "sigmoid", "HardSigmoid": "hard_sigmoid", "Hardsigmoid": "hard_sigmoid"}


@dataclass(frozen=True)
class Edit:
    """One change to one module of the model."""

    path: str
    action: str
    old_class: str
    new_class: str
    channels: int
    kernel_size: int
    gate: str
    params_before: int
    params_after: int
    rule: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Every edit a recipe makes to a model, with the parameter totals it gives."""

    model: str
    recipe: Recipe
    edits: tuple[Edit, ...]
    params_before: int
    rule_matches: tuple[int, ...]

    @property
    def params_removed(self) -> int:
        """Parameters of the modules that the plan takes out (the SE blocks it replaces)."""
        return sum(e.params_before for e in self.edits)

    @property
    def params_added(self) -> int:
        """Parameters of the ECA blocks that the plan puts in."""
        return sum(e.params_after for e in self.edits)

    @property
    def params_after(self) -> int:
        return self.params_before - self.params_removed + self.params_added

    @property
    def params_delta(self) -> int:
        return self.params_after - self.params_before


def count_params(module: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once (as timm does)."""
    return sum(p.numel() for p in module.parameters())


def make_plan(model: nn.Module, recipe: Recipe, model_name: str) -> Plan:
    """Resolve ``recipe`` against ``model``. Raises RecipeError for a rule that matches
    nothing (unless it is optional) and for two rules that would change the same module."""
    se_blocks = find_se_blocks(model)
    edits: list[Edit] = []
    matches: list[int] = []
    owner: dict[str, int] = {}
    for index, rule in enumerate(recipe.rules):
        selected = _select(rule, se_blocks)
        if not selected and not rule.optional:
            raise _no_match(model, model_name, recipe, index, rule)
        for block in selected:
            if block.path in owner:
                raise RecipeError(
                    f"Recipe {recipe.source}: rules {owner[block.path] + 1} and {index + 1} both "
                    f"change module {block.path!r} of {model_name}. Narrow one rule's selector so "
                    "each module is changed by one rule only."
                )
            owner[block.path] = index
            edits.append(_replace_edit(block, rule, index))
        matches.append(len(selected))
    return Plan(model_name, recipe, tuple(edits), count_params(model), tuple(matches))


def _select(rule: Rule, se_blocks: list[SEBlock]) -> list[SEBlock]:
    return list(se_blocks) if rule.select.se else []


def _replace_edit(block: SEBlock, rule: Rule, index: int) -> Edit:
    opts = rule.eca
    k = opts.kernel_size or eca_kernel_size(block.channels, opts.gamma, opts.b)
    return Edit(
        path=block.path,
        action="replace",
        old_class=block.class_name,
        new_class=ECA_CLASS,
        channels=block.channels,
        kernel_size=k,
        gate=_gate_name(opts.gate, block),
        params_before=count_params(block.module),
        params_after=k,
        rule=index,
    )


def _gate_name(gate: str, block: SEBlock) -> str:
    if gate != "keep":
        return gate
    name = _GATE_NAMES.get(block.gate.__name__) if block.gate else None
    if name is None:
        raise RecipeError(
            f"gate: keep cannot reuse the gate of SE block {block.path!r} "
            f"({block.gate.__name__ if block.gate else 'none found'}); "
            "use 'gate: sigmoid' or 'gate: hard_sigmoid' instead."
        )
    return name


def _no_match(model: nn.Module, model_name: str, recipe: Recipe, index: int, rule: Rule) -> RecipeError:
    hint = ""
    if rule.select.se:
        attn_like = [
            f"{p} ({type(m).__name__})"
            for p, m in model.named_modules()
            if p.rsplit(".", 1)[-1] in _ATTN_NAMES and not isinstance(m, nn.Identity)
        ]
        if attn_like:
            hint = f" Attention modules that are not known SE blocks: {', '.join(attn_like[:5])}."
        else:
            hint = f" {model_name} has no SE blocks; pick a model with SE blocks (e.g. seresnet50, efficientnet_b0)."
    return RecipeError(
        f"Recipe {recipe.source}: rule {index + 1} ({rule.action} {rule.select.describe()}) matches "
        f"nothing in {model_name}.{hint} Check the model name and the rule's selector, or mark the "
        "rule 'optional: true' if that is expected."
    )
