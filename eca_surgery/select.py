"""Resolve a recipe rule's selector against a model: which modules (or attention slots) it acts on.

Selection reads the module tree, the SE blocks, and the stages and blocks that timm's
``feature_info`` names (or that :mod:`eca_surgery.stages` traces, for other models); it
says *where* a rule acts, not with how many channels or under which name (that is planning, in :mod:`eca_surgery.plan`). A rule that selects
nothing gets a :class:`RecipeError` with a hint at what was probably meant.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from .detect import SEBlock, find_se_blocks, qualified_name, register_call, register_hint, unknown_se_modules
from .edits import Position
from .errors import RecipeError
from .locate import (
    ATTN_SLOTS,
    block_paths,
    empty_slot,
    feature_branch_paths,
    is_features_only,
)
from .probe import probe
from .recipe import Recipe, Rule, Selector, compile_glob, compile_regex, excerpt
from .stages import Stages, model_stages


@dataclass(frozen=True)
class ModelView:
    """What selection and planning read from a model: its modules by path, its SE blocks,
    its stages (found when first asked for: tracing them runs the model), and the name that
    messages call it by."""

    model: nn.Module
    name: str
    modules: dict[str, nn.Module]
    se: dict[str, SEBlock]

    @classmethod
    def of(cls, model: nn.Module, name: str) -> ModelView:
        se = {b.path: b for b in find_se_blocks(model)}
        return cls(model, name, dict(model.named_modules()), se)

    @cached_property
    def staging(self) -> Stages:
        return model_stages(self.model)

    @property
    def stages(self) -> list[str]:
        return self.staging.paths


@dataclass(frozen=True)
class RuleRef:
    """One rule of a recipe and its place there, for messages that point at the recipe."""

    recipe: Recipe
    index: int

    @property
    def rule(self) -> Rule:
        return self.recipe.rules[self.index]

    @property
    def number(self) -> int:
        """The rule's 1-based number, as messages count rules."""
        return self.index + 1

    def where(self, *keys: str | int) -> str:
        """'SOURCE, line N: rules[i].KEY...' of a field of this rule."""
        return self.recipe.where("rules", self.index, *keys)


@dataclass(frozen=True)
class Target:
    """A place a rule acts on, before its channel count is known."""

    path: str
    position: Position
    ref: RuleRef


def select_targets(view: ModelView, ref: RuleRef) -> list[Target]:
    """The places ``ref``'s rule acts on, in module-tree order (empty when it matches nothing)."""
    rule, sel = ref.rule, ref.rule.select
    if rule.action == "replace":
        return [Target(p, Position.IN_PLACE, ref) for p in _select(view, ref, sel, view.modules)]
    if sel.placement == "in-blocks":
        return _in_blocks(view, ref, sel)
    where = Position(rule.where)
    if sel.placement == "backbone-end":
        return [Target(_final_path(view, ref), where, ref)]
    if sel.placement == "feature-branches":
        return [Target(p, where, ref) for p in _branches(view, ref, sel)]
    return [Target(p, where, ref) for p in _select(view, ref, sel, view.modules)]


def _select(view: ModelView, ref: RuleRef, sel: Selector, pool: dict[str, nn.Module]) -> list[str]:
    """Paths in ``pool`` that satisfy every criterion of ``sel`` but placement."""
    allowed = _staged(view, ref, sel) if sel.stages is not None or sel.blocks is not None else None
    return [
        path
        for path, module in pool.items()
        if path and (allowed is None or path in allowed) and _meets(view, sel, path, module)
    ]


def _meets(view: ModelView, sel: Selector, path: str, module: nn.Module) -> bool:
    """Whether ``module`` at ``path`` meets the se, path, regex and class criteria of ``sel``."""
    if sel.se and path not in view.se:
        return False
    if sel.path and not any(compile_glob(g).fullmatch(path) for g in sel.path):
        return False
    if sel.regex and not any(compile_regex(r).fullmatch(path) for r in sel.regex):
        return False
    return not sel.cls or _class_matches(type(module), sel.cls)


def _class_matches(cls: type, names: tuple[str, ...]) -> bool:
    return any(
        n in (cls.__name__, qualified_name(cls)) or fnmatch.fnmatchcase(cls.__name__, n) for n in names
    )


def _staged(view: ModelView, ref: RuleRef, sel: Selector) -> set[str]:
    """The stages a selector names or, with ``blocks``, the blocks of those stages."""
    stages = _pick(view, ref, "stages", sel.stages or "all", view.stages, "stage")
    if sel.blocks is None:
        return set(stages)
    chosen: set[str] = set()
    for stage in stages:
        blocks = block_paths(view.model, stage)
        if blocks:
            chosen.update(_pick(view, ref, "blocks", sel.blocks, blocks, f"block of {stage}", strict=False))
    return chosen


def _pick(
    view: ModelView,
    ref: RuleRef,
    key: str,
    spec: str | tuple[int, ...],
    items: list[str],
    what: str,
    strict: bool = True,
) -> list[str]:
    """The ``items`` that ``spec`` ('all', 'last' or indices) names; with ``strict``, a
    RecipeError listing them for an index out of range (else such an index is skipped)."""
    if spec == "all":
        return list(items)
    if spec == "last":
        return items[-1:]
    bad = [i for i in spec if not -len(items) <= i < len(items)]
    if bad and strict:
        listing = ", ".join(f"{i}: {p}" for i, p in enumerate(items)) or "none"
        raise RecipeError(
            f"Recipe {ref.where('select', key)}: {what} index {bad[0]} is out "
            f"of range; {view.name} has {len(items)} {what}s ({view.staging.how}): {listing}. "
            "Negative indices count from the end."
        )
    return [items[i] for i in spec if -len(items) <= i < len(items)]


def _in_blocks(view: ModelView, ref: RuleRef, sel: Selector) -> list[Target]:
    """The empty attention slots of the selected blocks (every module, without stages/blocks)."""
    pool = view.modules
    if sel.stages is not None or sel.blocks is not None:
        blocks = _staged(view, ref, Selector(stages=sel.stages or "all", blocks=sel.blocks or "all"))
        pool = {p: m for p, m in view.modules.items() if p in blocks}
    out = []
    for path in _narrow(view, ref, sel, pool):
        slot = empty_slot(view.modules[path])
        if slot is not None:
            out.append(Target(f"{path}.{slot}", Position.SLOT, ref))
    return out


def _final_path(view: ModelView, ref: RuleRef) -> str:
    """The module that produces the model's final feature map: for a timm model the one
    whose output ``forward_features`` returns, or that gives a features_only model's last
    map (found by one probe pass; its last stage may run after it, unused), else the last
    traced stage of its backbone."""
    if hasattr(view.model, "forward_features") or is_features_only(view.model):
        final = probe(view.model, [], find_final=True).final
    else:
        final = view.stages[-1] if view.stages else None
    if final is None:
        raise RecipeError(
            f"Recipe {ref.where('select', 'placement')}: cannot find the module "
            f"that produces {view.name}'s final feature map (it may be made by a function, not a "
            "module, or the model gives no NCHW map). Use an insert rule with a 'path' selector "
            "naming the module instead."
        )
    return final


def _branches(view: ModelView, ref: RuleRef, sel: Selector) -> list[str]:
    """The modules whose outputs a features_only model returns, narrowed by ``sel``."""
    if not is_features_only(view.model):
        raise RecipeError(
            f"Recipe {ref.where('select', 'placement')}: feature-branches needs "
            f"a features_only model, and {view.name} was built as a classifier. Pass `features_only=True` "
            "(and `out_indices` to choose the maps), or build it with timm.create_model(..., "
            "features_only=True)."
        )
    return _narrow(view, ref, sel, {p: view.modules[p] for p in feature_branch_paths(view.model)})


def _narrow(view: ModelView, ref: RuleRef, sel: Selector, pool: dict[str, nn.Module]) -> list[str]:
    """Paths in ``pool`` (in its order) that meet the path, regex and class criteria of a
    placement's selector; all of them when it gives none."""
    return _select(view, ref, Selector(path=sel.path, regex=sel.regex, cls=sel.cls), pool)


# -- a rule that matches nothing -----------------------------------------------------------


def no_match(view: ModelView, ref: RuleRef) -> RecipeError:
    """The error for a rule that selects nothing, with a hint at what was probably meant."""
    sel = ref.rule.select
    return RecipeError(
        f"Recipe {ref.where()}: rule {ref.number} ({ref.rule.action} "
        f"{excerpt(sel.describe(), 200)}) matches nothing in {view.name}.{_hint(view, sel)} Check the model "
        "name and the rule's selector, or mark the rule 'optional: true' if that is expected."
    )


def _hint(view: ModelView, sel: Selector) -> str:
    """A sentence (with a leading space) about what the selector may have meant, or ''."""
    if sel.path or sel.regex:
        return _path_hint(view, [*sel.path, *sel.regex])
    if sel.cls:
        return _class_hint(view, sel.cls)
    if sel.placement == "in-blocks":
        return (
            f" No selected block of {view.name} has an empty attention slot (an 'se' or 'attn' "
            "attribute that is None or Identity), so in-blocks has no place to put ECA there; use "
            "'stages' or 'placement: backbone-end' (the eca-after-stages and eca-backbone-end recipes), "
            "'path'/'regex'/'class' selectors, or se-to-eca to replace existing SE blocks."
        )
    if sel.se:
        return _se_hint(view)
    return ""


def _path_hint(view: ModelView, patterns: list[str]) -> str:
    close = sorted({m for p in patterns for m in difflib.get_close_matches(p, view.modules, n=5, cutoff=0.5)})
    return f" Paths that nearly match: {', '.join(close[:5])}." if close else ""


def _class_hint(view: ModelView, names: tuple[str, ...]) -> str:
    classes = {type(m).__name__ for m in view.modules.values()}
    close = sorted({m for c in names for m in difflib.get_close_matches(c.rsplit(".", 1)[-1], classes, n=5)})
    return f" Classes in the model that nearly match: {', '.join(close)}." if close else ""


def _se_hint(view: ModelView) -> str:
    """Why an SE selector found nothing: ECA already there, unknown attention, or no SE at all."""
    ecas = [(p, type(m).__name__) for p, m in view.modules.items() if _is_eca(m)]
    if ecas:
        first_path, first_cls = ecas[0]
        return (
            f" {view.name} already has {len(ecas)} ECA block{'s' if len(ecas) > 1 else ''} (e.g. at "
            f"{first_path}, class {first_cls}), so there is no SE block left to replace; it may be "
            "converted already, or be one of timm's ECA models."
        )
    unknown = unknown_se_modules(view.model)
    if unknown:
        listing = ", ".join(f"{p} ({type(m).__name__})" for p, m in unknown[:5])
        return (
            f" Modules that look like SE blocks but whose class is not known: {listing}. Register "
            f"the class once and every command knows it: {register_hint(unknown[0][1])}."
        )
    attn_like = [
        (p, m)
        for p, m in view.modules.items()
        if p.rsplit(".", 1)[-1] in ATTN_SLOTS and not isinstance(m, nn.Identity)
    ]
    if attn_like:
        listing = ", ".join(f"{p} ({type(m).__name__})" for p, m in attn_like[:5])
        return (
            f" Attention modules that are not known SE blocks: {listing}. If one is an SE block, "
            f"register its class: {_register_example(attn_like)}."
        )
    return f" {view.name} has no SE blocks; pick a model with SE blocks (e.g. seresnet50, efficientnet_b0)."


def _register_example(modules: list[tuple[str, nn.Module]]) -> str:
    """The ``register_se`` call for the first module whose class is not a torch.nn layer."""
    own = [m for _, m in modules if not type(m).__module__.startswith("torch.nn")]
    return register_hint(own[0]) if own else register_call("MySE")


def _is_eca(module: nn.Module) -> bool:
    """An ECA block: timm's EcaModule or CecaModule (by class, subclasses included), which are
    also what this tool puts in."""
    from timm.layers import CecaModule, EcaModule

    return isinstance(module, (EcaModule, CecaModule))
