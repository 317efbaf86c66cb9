"""Plan a recipe on a model: a plain, printable list of edits.

Which modules each rule acts on is selection (:mod:`eca_surgery.select`); planning
measures the channels there (one probe pass, which works on the meta device), names
where each new ECA block lives, resolves ``gate: keep``, checks kernel sizes and
refuses two rules that change one module. The model is left as it was found;
``apply.apply_plan`` carries the plan out.

Where each new ECA block lives (its state_dict prefix):

* ``replace`` at path ``P`` (an SE block, or any shape-preserving module): ``P``;
* ``insert`` with ``placement: in-blocks``: the block's empty attention slot, ``B.se``
  (or ``B.attn``), exactly where timm's own ECA models keep it;
* ``insert`` after module ``P``: ``P.eca``; before it: ``P.eca_before``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .detect import qualified_name
from .eca import eca_kernel_size
from .edits import ECA_CLASS, Edit, Gate, Position
from .errors import RecipeError
from .locate import is_plain_sequential, runs_own_children
from .probe import Calls, probe
from .recipe import Recipe
from .select import ModelView, RuleRef, Target, no_match, select_targets

__all__ = ["GATE_NAMES", "INSERT_NAMES", "Edit", "Plan", "count_params", "make_plan"]

# the child name of an ECA inserted after / before a module
INSERT_NAMES = {Position.AFTER: "eca", Position.BEFORE: "eca_before"}
# the gate an SE block's gate class (by name) keeps, for ``gate: keep``
GATE_NAMES = {"Sigmoid": Gate.SIGMOID, "HardSigmoid": Gate.HARD_SIGMOID, "Hardsigmoid": Gate.HARD_SIGMOID}


def _clash(a: Position, b: Position) -> bool:
    """Whether two edits of one module at positions ``a`` and ``b`` cannot both be made."""
    return a == b or a.inserts != b.inserts


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
    """Resolve ``recipe`` against ``model`` without changing it.

    Raises RecipeError for a rule that matches nothing (unless it is optional), for two
    rules that would change the same module, and where a channel count cannot be known.
    """
    view = ModelView.of(model, model_name)
    targets, matches = _select_all(view, recipe)
    probed = _probe(view, targets)
    edits = tuple(_edit(view, probed, t) for t in targets)
    return Plan(model_name, recipe, edits, count_params(model), tuple(matches))


def _select_all(view: ModelView, recipe: Recipe) -> tuple[list[Target], list[int]]:
    """Every rule's targets in rule order, and how many each rule matched; RecipeError for a
    rule that matches nothing (unless optional) or changes a module an earlier rule changes."""
    targets: list[Target] = []
    matches: list[int] = []
    owner: dict[tuple[str, Position], int] = {}
    for index in range(len(recipe.rules)):
        ref = RuleRef(recipe, index)
        found = select_targets(view, ref)
        if not found and not ref.rule.optional:
            raise no_match(view, ref)
        for target in found:
            _claim(owner, target, view.name)
        targets.extend(found)
        matches.append(len(found))
    return targets, matches


def _claim(owner: dict[tuple[str, Position], int], target: Target, model_name: str) -> None:
    """Record in ``owner`` that ``target``'s rule changes its module: a module is replaced (or its
    slot filled) once, or gets ECA after and/or before it; RecipeError for a second change."""
    path = target.path
    clash = next(
        # the same place twice, or a module changed in place (replaced, slot filled) also getting
        # an ECA beside it, or the reverse
        (owner[(path, p)] for p in Position if _clash(target.position, p) and (path, p) in owner),
        None,
    )
    if clash is not None:
        raise RecipeError(
            f"Recipe {target.ref.where()}: rules {clash + 1} and {target.ref.number} both change module "
            f"{path!r} of {model_name}. Narrow one rule's selector so each module is changed "
            "by one rule only."
        )
    owner[(path, target.position)] = target.ref.index


@dataclass(frozen=True)
class _Probed:
    """What the probe pass saw at the targets that are not SE blocks: the shapes each module
    saw per call, and whether a module would run a child added to it."""

    calls: dict[str, Calls]
    runs_children: dict[str, bool]


def _probe(view: ModelView, targets: list[Target]) -> _Probed:
    """Run the model once (only if some target is not an SE block, whose channels are known)."""
    probed = [t for t in targets if t.path not in view.se]
    if not probed:
        return _Probed({}, {})
    slots = sorted({t.path for t in probed if t.position == Position.SLOT})
    others = sorted({t.path for t in probed if t.position != Position.SLOT})
    owners = sorted({o for t in probed if t.position.inserts for o in _owner_candidates(view, t.path)})
    result = probe(view.model, others, slots, owners=owners)
    return _Probed(result.calls, result.runs_added_child)


def _owner_candidates(view: ModelView, path: str) -> list[str]:
    """Modules that might hold an ECA inserted at ``path`` (the module, then its parent) and
    whose habit of running their children must be traced (containers are known to)."""
    parent = path.rpartition(".")[0]
    return [p for p in (path, parent) if p in view.modules and not runs_own_children(view.modules[p])]


def _edit(view: ModelView, probed: _Probed, target: Target) -> Edit:
    """The edit at one target: its channels, where its ECA lives, kernel size and gate."""
    rule, path, position = target.ref.rule, target.path, target.position
    module = view.modules.get(path)
    if path in view.se:
        channels = view.se[path].channels
    else:
        channels = _measure(view.name, target, probed.calls.get(path))
    eca_path = _insert_path(view, probed, path, position) if position.inserts else path
    k = _kernel_size(view.name, target, channels)
    return Edit(
        path=path,
        action=rule.action,
        position=position,
        eca_path=eca_path,
        old_class=qualified_name(type(module)) if module is not None else "None",
        new_class=ECA_CLASS,
        channels=channels,
        kernel_size=k,
        gate=_gate(view, rule.eca.gate, path),
        params_before=count_params(module) if not position.inserts and module is not None else 0,
        params_after=k,
        rule=target.ref.index,
    )


def _measure(model_name: str, target: Target, calls: Calls | None) -> int:
    """The channel count at a target, from the probe pass; RecipeError where it cannot be known."""
    where = f"{model_name} module {target.path!r}"
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
    shape = calls.inputs[0] if target.position == Position.BEFORE else calls.outputs[0]
    if target.position == Position.IN_PLACE and calls.inputs[0] != calls.outputs[0]:
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


def _kernel_size(model_name: str, target: Target, channels: int) -> int:
    """The rule's kernel size at ``channels`` channels; RecipeError for a kernel wider than the
    channels it slides over (it would add weights that never meet a channel, and a huge one
    would exhaust memory)."""
    ref, eca = target.ref, target.ref.rule.eca
    k = eca.kernel_size or eca_kernel_size(channels, eca.gamma, eca.b)
    if 1 <= k <= channels:
        return k
    how = "kernel_size" if eca.kernel_size else f"gamma {eca.gamma:g} and b {eca.b:g}"
    where = ref.where("eca", "kernel_size") if eca.kernel_size else ref.where("eca")
    raise RecipeError(
        f"Recipe {where}: rule {ref.number} gives {model_name} module "
        f"{target.path!r} ({channels} channels) an ECA kernel of size {k} (from {how}); the kernel "
        f"must be between 1 and the channel count, {channels}. Choose a smaller kernel_size, or a "
        "larger gamma or smaller b."
    )


def _insert_path(view: ModelView, probed: _Probed, path: str, position: Position) -> str:
    """Where an ECA inserted after/before ``path`` lives, so that it runs exactly once:
    its child ``eca``/``eca_before``, unless the module runs every child it holds
    (RegStage, DenseBlock); then a sibling ``NAME_eca``/``NAME_eca_before`` in its parent."""
    module, suffix = view.modules[path], INSERT_NAMES[position]
    owner, name = path, suffix
    if _runs_children(view, probed, path):
        owner, _, last = path.rpartition(".")
        if _runs_children(view, probed, owner):
            raise RecipeError(
                f"Cannot insert ECA {position} {path!r} ({type(module).__name__}) of {view.name}: it runs "
                "every child it holds, and so does its parent, so there is nowhere to put an ECA that "
                "runs exactly there. Select a module inside it."
            )
        name = f"{last}_{suffix}"
    if hasattr(view.modules[owner], name):
        raise RecipeError(
            f"Cannot insert ECA {position} {path!r}: {owner or 'the model'} already has {name!r}."
        )
    return f"{owner}.{name}" if owner else name


def _runs_children(view: ModelView, probed: _Probed, path: str) -> bool:
    """Whether the module at ``path`` would run a child added to it: seen in the probe pass, or
    a container other than a plain Sequential (where the child's place in the order is chosen)."""
    module = view.modules[path]
    return bool(probed.runs_children.get(path)) or (
        runs_own_children(module) and not is_plain_sequential(module)
    )


def _gate(view: ModelView, gate: str, path: str) -> Gate:
    """The rule's gate; for ``keep``, the gate of the SE block at ``path`` (sigmoid or hard sigmoid)."""
    if gate != "keep":
        return Gate(gate)
    block = view.se.get(path)
    kept = GATE_NAMES.get(block.gate.__name__) if block and block.gate else None
    if kept is None:
        found = block.gate.__name__ if block and block.gate else "none found"
        raise RecipeError(
            f"gate: keep cannot reuse the gate of {path!r} ({found}); it works on SE blocks "
            "with a sigmoid or hard-sigmoid gate. Use 'gate: sigmoid' or 'gate: hard_sigmoid'."
        )
    return kept
