"""Resolve a recipe against a model into a plan: a plain, printable list of edits.

Planning reads the model (its module tree, weight shapes, and for insertions the
shapes of one probe pass, all of which work on the meta device) and leaves it as it
found it; ``apply.apply_plan`` carries the plan out.

Where each new ECA block lives (its state_dict prefix):

* ``replace`` at path ``P`` (an SE block, or any shape-preserving module): ``P``;
* ``insert`` with ``placement: in-blocks``: the block's empty attention slot, ``B.se``
  (or ``B.attn``), exactly where timm's own ECA models keep it;
* ``insert`` after module ``P``: ``P.eca``; before it: ``P.eca_before``.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from torch import nn

from .detect import find_se_blocks, qualified_name
from .eca import eca_kernel_size
from .edits import ECA_CLASS, Edit, Gate, Position
from .errors import RecipeError
from .locate import (
    block_paths,
    empty_slot,
    feature_branch_paths,
    is_features_only,
    is_plain_sequential,
    runs_own_children,
    stage_paths,
)
from .probe import probe
from .recipe import Recipe, Rule, Selector, compile_glob, compile_regex, excerpt

INSERT_NAMES = {"after": "eca", "before": "eca_before"}
_ATTN_NAMES = {"se", "se_module", "attn", "attention"}
GATE_NAMES = {"Sigmoid": "sigmoid", "HardSigmoid": "hard_sigmoid", "Hardsigmoid": "hard_sigmoid"}


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


@dataclass(frozen=True)
class _Target:
    """A place a rule acts on, before its channel count is known."""

    path: str
    position: str
    rule: int


class _Planner:
    def __init__(self, model: nn.Module, recipe: Recipe, model_name: str):
        self.model = model
        self.recipe = recipe
        self.name = model_name
        self.modules = dict(model.named_modules())
        self.se = {b.path: b for b in find_se_blocks(model)}
        self.stages = stage_paths(model)

    # -- selection ---------------------------------------------------------------

    def targets(self, index: int, rule: Rule) -> list[_Target]:
        sel = rule.select
        if rule.action == "replace":
            return [_Target(p, "in-place", index) for p in self.select(index, sel, self.modules)]
        if sel.placement == "in-blocks":
            return self.in_blocks(index, sel)
        if sel.placement == "backbone-end":
            return [_Target(self.final_path(index), rule.where, index)]
        if sel.placement == "feature-branches":
            return [_Target(p, rule.where, index) for p in self.branches(index, sel)]
        return [_Target(p, rule.where, index) for p in self.select(index, sel, self.modules)]

    def select(self, index: int, sel: Selector, pool: dict[str, nn.Module]) -> list[str]:
        """Paths in ``pool`` that satisfy every criterion of ``sel`` but placement."""
        allowed = self.staged(index, sel) if sel.stages is not None or sel.blocks is not None else None
        out = []
        for path, module in pool.items():
            if not path or (allowed is not None and path not in allowed):
                continue
            if sel.se and path not in self.se:
                continue
            if sel.path and not any(compile_glob(g).fullmatch(path) for g in sel.path):
                continue
            if sel.regex and not any(compile_regex(r).fullmatch(path) for r in sel.regex):
                continue
            if sel.cls and not _class_matches(type(module), sel.cls):
                continue
            out.append(path)
        return out

    def staged(self, index: int, sel: Selector) -> set[str]:
        """The stages a selector names or, with ``blocks``, the blocks of those stages."""
        stages = self.pick(index, "stages", sel.stages or "all", self.stages, "stage")
        if sel.blocks is None:
            return set(stages)
        chosen: set[str] = set()
        for stage in stages:
            blocks = block_paths(self.model, stage)
            if blocks:
                chosen.update(
                    self.pick(index, "blocks", sel.blocks, blocks, f"block of {stage}", strict=False)
                )
        return chosen

    def pick(
        self,
        index: int,
        key: str,
        spec: str | tuple[int, ...],
        items: list[str],
        what: str,
        strict: bool = True,
    ) -> list[str]:
        if spec == "all":
            return list(items)
        if spec == "last":
            return items[-1:]
        bad = [i for i in spec if not -len(items) <= i < len(items)]
        if bad and strict:
            listing = ", ".join(f"{i}: {p}" for i, p in enumerate(items)) or "none"
            raise RecipeError(
                f"Recipe {self.recipe.where('rules', index, 'select', key)}: {what} index {bad[0]} is out "
                f"of range; {self.name} has {len(items)} {what}s (feature_info): {listing}. "
                "Negative indices count from the end."
            )
        return [items[i] for i in spec if -len(items) <= i < len(items)]

    def in_blocks(self, index: int, sel: Selector) -> list[_Target]:
        pool = self.modules
        if sel.stages is not None or sel.blocks is not None:
            blocks = self.staged(index, Selector(stages=sel.stages or "all", blocks=sel.blocks or "all"))
            pool = {p: m for p, m in self.modules.items() if p in blocks}
        out = []
        for path in self.narrow(index, sel, pool):
            slot = empty_slot(self.modules[path])
            if slot is not None:
                out.append(_Target(f"{path}.{slot}", "slot", index))
        return out

    def final_path(self, index: int) -> str:
        final = probe(self.model, [], find_final=True).final
        if final is None:
            raise RecipeError(
                f"Recipe {self.recipe.where('rules', index, 'select', 'placement')}: cannot find the module "
                f"that produces {self.name}'s final feature map (it may be made by a function, not a "
                "module). Use an insert rule with a 'path' selector naming the module instead."
            )
        return final

    def branches(self, index: int, sel: Selector) -> list[str]:
        if not is_features_only(self.model):
            raise RecipeError(
                f"Recipe {self.recipe.where('rules', index, 'select', 'placement')}: feature-branches needs "
                f"a features_only model, and {self.name} was built as a classifier. Pass --features-only "
                "(and --out-indices to choose the maps), or build it with timm.create_model(..., "
                "features_only=True)."
            )
        return self.narrow(index, sel, {p: self.modules[p] for p in feature_branch_paths(self.model)})

    def narrow(self, index: int, sel: Selector, pool: dict[str, nn.Module]) -> list[str]:
        """Paths in ``pool`` (in its order) that meet the path, regex and class criteria of a
        placement's selector; all of them when it gives none."""
        return self.select(index, Selector(path=sel.path, regex=sel.regex, cls=sel.cls), pool)

    # -- edits ---------------------------------------------------------------------

    def edits(self, targets: list[_Target]) -> list[Edit]:
        probed = [t for t in targets if t.path not in self.se]
        self.calls, self.runs_children = {}, {}
        if probed:
            slots = sorted({t.path for t in probed if t.position == "slot"})
            others = sorted({t.path for t in probed if t.position != "slot"})
            owners = sorted(
                {o for t in probed if t.position in INSERT_NAMES for o in self.owner_candidates(t.path)}
            )
            result = probe(self.model, others, slots, owners=owners)
            self.calls, self.runs_children = result.calls, result.runs_added_child
        return [self.edit(t, self.calls.get(t.path)) for t in targets]

    def owner_candidates(self, path: str) -> list[str]:
        """Modules that might hold an ECA inserted at ``path`` (the module, then its parent) and
        whose habit of running their children must be traced (containers are known to)."""
        parent = path.rpartition(".")[0]
        return [p for p in (path, parent) if p in self.modules and not runs_own_children(self.modules[p])]

    def edit(self, target: _Target, calls) -> Edit:
        rule = self.recipe.rules[target.rule]
        path, position = target.path, target.position
        module = self.modules.get(path)
        if path in self.se:
            channels = self.se[path].channels
        else:
            channels = self.measure(target, calls)
        eca_path = self.insert_path(path, position) if position in INSERT_NAMES else path
        k = rule.eca.kernel_size or eca_kernel_size(channels, rule.eca.gamma, rule.eca.b)
        if not 1 <= k <= channels:
            self.kernel_too_large(target, channels, k)
        return Edit(
            path=path,
            action=rule.action,
            position=Position(position),
            eca_path=eca_path,
            old_class=qualified_name(type(module)) if module is not None else "None",
            new_class=ECA_CLASS,
            channels=channels,
            kernel_size=k,
            gate=Gate(self.gate(rule.eca.gate, path)),
            params_before=count_params(module)
            if position in ("in-place", "slot") and module is not None
            else 0,
            params_after=k,
            rule=target.rule,
        )

    def kernel_too_large(self, target: _Target, channels: int, k: int) -> None:
        """Refuse an ECA kernel wider than the channels it slides over (it would add weights
        that never meet a channel, and a huge one would exhaust memory)."""
        eca = self.recipe.rules[target.rule].eca
        how = "kernel_size" if eca.kernel_size else f"gamma {eca.gamma:g} and b {eca.b:g}"
        key = (
            ("rules", target.rule, "eca", "kernel_size") if eca.kernel_size else ("rules", target.rule, "eca")
        )
        raise RecipeError(
            f"Recipe {self.recipe.where(*key)}: rule {target.rule + 1} gives {self.name} module "
            f"{target.path!r} ({channels} channels) an ECA kernel of size {k} (from {how}); the kernel "
            f"must be between 1 and the channel count, {channels}. Choose a smaller kernel_size, or a "
            "larger gamma or smaller b."
        )

    def insert_path(self, path: str, position: str) -> str:
        """Where an ECA inserted after/before ``path`` lives, so that it runs exactly once:
        its child ``eca``/``eca_before``, unless the module runs every child it holds
        (RegStage, DenseBlock); then a sibling ``NAME_eca``/``NAME_eca_before`` in its parent."""
        module, suffix = self.modules[path], INSERT_NAMES[position]
        owner, name = path, suffix
        if self.runs_children.get(path) or (runs_own_children(module) and not is_plain_sequential(module)):
            owner, _, last = path.rpartition(".")
            parent = self.modules[owner]
            if self.runs_children.get(owner) or (
                runs_own_children(parent) and not is_plain_sequential(parent)
            ):
                raise RecipeError(
                    f"Cannot insert ECA {position} {path!r} ({type(module).__name__}) of {self.name}: it runs "
                    "every child it holds, and so does its parent, so there is nowhere to put an ECA that "
                    "runs exactly there. Select a module inside it."
                )
            name = f"{last}_{suffix}"
        if hasattr(self.modules[owner], name):
            raise RecipeError(
                f"Cannot insert ECA {position} {path!r}: {owner or 'the model'} already has {name!r}."
            )
        return f"{owner}.{name}" if owner else name

    def measure(self, target: _Target, calls) -> int:
        """The channel count at a target, from the probe pass; RecipeError where it cannot be known."""
        where = f"{self.name} module {target.path!r}"
        if calls is None or not calls.outputs:
            raise RecipeError(
                f"{where} never runs in the model's forward pass, so an ECA placed there would never "
                "run either. Choose a module that the forward pass calls."
            )
        if len(calls.outputs) > 1:
            raise RecipeError(
                f"{where} runs {len(calls.outputs)} times per forward pass (it is shared), so its "
                "channel count and the ECA's place are ambiguous. Choose a module that runs once."
            )
        shape = calls.inputs[0] if target.position == "before" else calls.outputs[0]
        if target.position == "in-place" and calls.inputs[0] != calls.outputs[0]:
            raise RecipeError(
                f"{where} changes its input's shape {calls.inputs[0]} to {calls.outputs[0]}; ECA keeps "
                "shapes, so it can only replace shape-preserving modules (such as SE blocks)."
            )
        if shape is None or len(shape) != 4:
            raise RecipeError(
                f"{where} gives {'no tensor' if shape is None else f'a tensor of shape {shape}'}; ECA needs "
                "an NCHW feature map (batch, channels, height, width), so its channel count cannot be known."
            )
        return shape[1]

    def gate(self, gate: str, path: str) -> str:
        if gate != "keep":
            return gate
        block = self.se.get(path)
        name = GATE_NAMES.get(block.gate.__name__) if block and block.gate else None
        if name is None:
            found = block.gate.__name__ if block and block.gate else "none found"
            raise RecipeError(
                f"gate: keep cannot reuse the gate of {path!r} ({found}); it works on SE blocks "
                "with a sigmoid or hard-sigmoid gate. Use 'gate: sigmoid' or 'gate: hard_sigmoid'."
            )
        return name

    # -- errors --------------------------------------------------------------------

    def eca_blocks(self) -> list[tuple[str, str]]:
        """(path, class name) of the ECA blocks the model already has (timm's EcaModule and
        CecaModule, which are also what this tool puts in), found by class."""
        return [(p, type(m).__name__) for p, m in self.modules.items() if _is_eca(m)]

    def no_match(self, index: int, rule: Rule) -> RecipeError:
        sel = rule.select
        hint = ""
        if sel.path or sel.regex:
            patterns = [*sel.path, *sel.regex]
            close = sorted(
                {m for p in patterns for m in difflib.get_close_matches(p, self.modules, n=5, cutoff=0.5)}
            )
            if close:
                hint = f" Paths that nearly match: {', '.join(close[:5])}."
        elif sel.cls:
            classes = {type(m).__name__ for m in self.modules.values()}
            close = sorted(
                {m for c in sel.cls for m in difflib.get_close_matches(c.rsplit(".", 1)[-1], classes, n=5)}
            )
            if close:
                hint = f" Classes in the model that nearly match: {', '.join(close)}."
        elif sel.placement == "in-blocks":
            hint = (
                f" No selected block of {self.name} has an empty attention slot (an 'se' or 'attn' "
                "attribute that is None or Identity); use 'action: insert' without a placement to add ECA "
                "after modules, or se-to-eca to replace existing SE blocks."
            )
        elif sel.se and (ecas := self.eca_blocks()):
            first_path, first_cls = ecas[0]
            hint = (
                f" {self.name} already has {len(ecas)} ECA block{'s' if len(ecas) > 1 else ''} (e.g. at "
                f"{first_path}, class {first_cls}), so there is no SE block left to replace; it may be "
                "converted already, or be one of timm's ECA models."
            )
        elif sel.se:
            attn_like = [
                f"{p} ({type(m).__name__})"
                for p, m in self.modules.items()
                if p.rsplit(".", 1)[-1] in _ATTN_NAMES and not isinstance(m, nn.Identity)
            ]
            if attn_like:
                hint = f" Attention modules that are not known SE blocks: {', '.join(attn_like[:5])}."
            else:
                hint = f" {self.name} has no SE blocks; pick a model with SE blocks (e.g. seresnet50, efficientnet_b0)."
        return RecipeError(
            f"Recipe {self.recipe.where('rules', index)}: rule {index + 1} ({rule.action} "
            f"{excerpt(sel.describe(), 200)}) matches nothing in {self.name}.{hint} Check the model name and the "
            "rule's selector, or mark the rule 'optional: true' if that is expected."
        )


def _is_eca(module: nn.Module) -> bool:
    """An ECA block: timm's EcaModule or CecaModule (by class, subclasses included)."""
    from timm.layers import CecaModule, EcaModule

    return isinstance(module, (EcaModule, CecaModule))


def _class_matches(cls: type, names: tuple[str, ...]) -> bool:
    return any(
        n in (cls.__name__, qualified_name(cls)) or fnmatch.fnmatchcase(cls.__name__, n) for n in names
    )


def make_plan(model: nn.Module, recipe: Recipe, model_name: str) -> Plan:
    """Resolve ``recipe`` against ``model`` without changing it.

    Raises RecipeError for a rule that matches nothing (unless it is optional), for two
    rules that would change the same module, and where a channel count cannot be known.
    """
    planner = _Planner(model, recipe, model_name)
    targets: list[_Target] = []
    matches: list[int] = []
    owner: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(recipe.rules):
        found = planner.targets(index, rule)
        if not found and not rule.optional:
            raise planner.no_match(index, rule)
        for t in found:
            # a module is replaced (or its slot filled) once, or gets ECA after and/or before it
            clash = owner.get((t.path, t.position))
            if clash is None and t.position in INSERT_NAMES:
                clash = owner.get((t.path, "in-place"), owner.get((t.path, "slot")))
            if clash is None and t.position in ("in-place", "slot"):
                clash = owner.get((t.path, "after"), owner.get((t.path, "before")))
            if clash is not None:
                raise RecipeError(
                    f"Recipe {recipe.where('rules', index)}: rules {clash + 1} and {index + 1} both change module "
                    f"{t.path!r} of {model_name}. Narrow one rule's selector so each module is changed "
                    "by one rule only."
                )
            owner[(t.path, t.position)] = index
        targets.extend(found)
        matches.append(len(found))
    return Plan(model_name, recipe, tuple(planner.edits(targets)), count_params(model), tuple(matches))
