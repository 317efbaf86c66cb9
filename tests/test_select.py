"""The selection layer (select.py) on small timm models built on the meta device, and plans
that stay exactly what the planner made before selection was split from planning."""

import hashlib
import json

import pytest
import torch
from torch import nn

from eca_surgery.apply import apply_plan, check_applicable, find_misfit
from eca_surgery.eca import DoubleSigmoid, make_eca
from eca_surgery.edits import Edit, Gate, Position
from eca_surgery.errors import RecipeError, SurgeryError
from eca_surgery.models import create_model
from eca_surgery.plan import GATE_NAMES, INSERT_NAMES, make_plan
from eca_surgery.recipe import load_recipe, parse_recipe
from eca_surgery.select import ModelView, RuleRef, no_match, select_targets


def view_of(name, **kwargs):
    return ModelView.of(create_model(name, meta=True, **kwargs), name)


def rule(select, action="insert", extra=""):
    return parse_recipe(f"version: 1\nrules:\n  - action: {action}\n    select: {select}\n{extra}")


def targets(view, select, action="insert", extra=""):
    return [(t.path, t.position) for t in select_targets(view, RuleRef(rule(select, action, extra), 0))]


@pytest.fixture(scope="module")
def resnet18():
    return view_of("resnet18")


@pytest.fixture(scope="module")
def seresnet18():
    return view_of("seresnet18")


# 1. selectors


def test_view_reads_stages_and_se_blocks(resnet18, seresnet18):
    assert resnet18.stages == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert resnet18.se == {} and "layer1.0.bn1" in resnet18.modules
    assert sorted(seresnet18.se) == [f"layer{i}.{j}.se" for i in range(1, 5) for j in (0, 1)]
    assert seresnet18.se["layer4.1.se"].channels == 512


@pytest.mark.parametrize(
    "select, expected",
    [
        ("{stages: [0, -1]}", ["act1", "layer4"]),
        ("{stages: -1}", ["layer4"]),
        ("{stages: [1], blocks: all}", ["layer1.0", "layer1.1"]),
        ("{stages: [2, 3], blocks: last}", ["layer2.1", "layer3.1"]),
        ("{blocks: [-1]}", [f"layer{i}.1" for i in range(1, 5)]),
        ('{path: "layer4.**.bn1"}', ["layer4.0.bn1", "layer4.1.bn1"]),
        ('{regex: "layer[23]\\\\.0\\\\.conv2"}', ["layer2.0.conv2", "layer3.0.conv2"]),
        ('{class: BasicBlock, path: "layer2.*"}', ["layer2.0", "layer2.1"]),
        ('{class: "Batch*", stages: [1], path: "layer1.0.*"}', []),  # stages hold only stage modules
        ("{class: timm.models.resnet.BasicBlock, stages: [3], blocks: all}", ["layer3.0", "layer3.1"]),
    ],
)
def test_selectors_pick_modules_in_tree_order(resnet18, select, expected):
    assert targets(resnet18, select) == [(p, Position.AFTER) for p in expected]


def test_where_before_and_replace_positions(resnet18, seresnet18):
    before = parse_recipe(
        "version: 1\nrules:\n  - action: insert\n    where: before\n    select: {stages: [1]}\n"
    )
    assert [(t.path, t.position) for t in select_targets(resnet18, RuleRef(before, 0))] == [
        ("layer1", Position.BEFORE)
    ]
    found = targets(seresnet18, "{se: true, path: 'layer1.**'}", action="replace")
    assert found == [("layer1.0.se", Position.IN_PLACE), ("layer1.1.se", Position.IN_PLACE)]


def test_placements(resnet18, seresnet18):
    assert targets(resnet18, "{placement: in-blocks, stages: [-1]}") == [
        ("layer4.0.se", Position.SLOT),
        ("layer4.1.se", Position.SLOT),
    ]
    assert targets(seresnet18, "{placement: in-blocks}") == []  # the slots hold SE blocks
    assert targets(resnet18, "{placement: backbone-end}") == [("layer4", Position.AFTER)]
    pyramid = view_of("resnet18", features_only=True, out_indices=[1, 3])
    assert targets(pyramid, "{placement: feature-branches}") == [
        ("layer1", Position.AFTER),
        ("layer3", Position.AFTER),
    ]
    assert targets(pyramid, "{placement: feature-branches, path: layer3}") == [("layer3", Position.AFTER)]


def test_rule_ref_points_at_the_rule():
    recipe = parse_recipe("version: 1\nrules:\n  - action: insert\n    select: {stages: [1]}\n")
    ref = RuleRef(recipe, 0)
    assert ref.rule is recipe.rules[0] and ref.number == 1
    assert ref.where("select", "stages") == "<recipe>, line 4: rules[0].select.stages"


def test_selection_errors_point_at_the_selector(resnet18):
    with pytest.raises(
        RecipeError, match=r"line 4: rules\[0\]\.select\.stages: stage index 9 is out of range"
    ):
        targets(resnet18, "{stages: [9]}")
    with pytest.raises(RecipeError, match="`features_only=True` \\(and `out_indices` to choose the maps\\)"):
        targets(resnet18, "{placement: feature-branches}")


# 2. no-match hints


@pytest.mark.parametrize(
    "name, select, action, hint",
    [
        (
            "resnet18",
            '{path: "layer1.0.bn9"}',
            "insert",
            "Paths that nearly match: layer1.0.bn1, layer1.0.bn2",
        ),
        (
            "resnet18",
            "{class: BatchNorm3d}",
            "insert",
            "Classes in the model that nearly match: BatchNorm2d.",
        ),
        ("seresnet18", "{placement: in-blocks}", "insert", "has an empty attention slot"),
        ("resnet18", "{se: true}", "replace", "resnet18 has no SE blocks; pick a model with SE blocks"),
        (
            "ecaresnet26t",
            "{se: true}",
            "replace",
            "already has 8 ECA blocks (e.g. at layer1.0.se, class EcaModule)",
        ),
        ("resnet18", "{stages: [1], blocks: [3]}", "insert", "matches nothing in resnet18. Check the model"),
    ],
)
def test_no_match_hints(name, select, action, hint):
    view = view_of(name)
    ref = RuleRef(rule(select, action), 0)
    assert select_targets(view, ref) == []
    error = no_match(view, ref)
    assert isinstance(error, RecipeError)
    assert str(error).startswith(f"Recipe <recipe>, line 3: rules[0]: rule 1 ({action} ")
    assert hint in str(error)
    assert str(error).endswith("mark the rule 'optional: true' if that is expected.")


class AttnToy(nn.Module):
    """A model with an attention module that is no SE block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.attn(self.conv(x))


def test_no_match_names_attention_modules_that_are_not_se():
    view = ModelView.of(AttnToy(), "toy")
    error = no_match(view, RuleRef(rule("{se: true}", "replace"), 0))
    assert "Attention modules that are not known SE blocks: attn (Conv2d)." in str(error)


# 3. plans unchanged by the split: frozen from the planner before it


def digest(plan):
    data = json.dumps([e.to_dict() for e in plan.edits], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "recipe, name, kwargs, matches, first, last, sha",
    [
        ("se-to-eca", "seresnet18", {}, (8,), "layer1.0.se", "layer4.1.se", "279134c2cc68f12a"),
        ("eca-in-blocks", "resnet18", {}, (8,), "layer1.0.se", "layer4.1.se", "fe6cd40572dc3b83"),
        ("eca-after-stages", "resnet18", {}, (3,), "layer2.eca", "layer4.eca", "3554b35b1532093a"),
        ("eca-backbone-end", "seresnet18", {}, (1,), "layer4.eca", "layer4.eca", "57eeceeb4380574f"),
        (
            "eca-feature-pyramid",
            "resnet18",
            {"features_only": True, "out_indices": [1, 2, 3]},
            (3,),
            "layer1.eca",
            "layer3.eca",
            "8dba34c7f312f978",
        ),
        ("se-to-eca", "efficientnet_b0", {}, (16,), "blocks.0.0.se", "blocks.6.0.se", "830fc331831eb2d7"),
        ("eca-after-stages", "efficientnet_b0", {}, (3,), "blocks.2.eca", "blocks.6.eca", "9a6e2b70b496ac1d"),
        ("eca-after-stages", "regnety_002", {}, (3,), "s2_eca", "s4_eca", "a8fb5c8ae595f498"),
        (
            "eca-after-stages",
            "densenet121",
            {},
            (3,),
            "features.denseblock2_eca",
            "features.norm5.eca",
            "94c0656dc126f60c",
        ),
        (
            "eca-in-blocks",
            "test_efficientnet",
            {},
            (2,),
            "blocks.1.0.se",
            "blocks.2.0.se",
            "a4d8aea79f7f74f9",
        ),
    ],
)
def test_plans_are_what_the_planner_made_before_the_split(recipe, name, kwargs, matches, first, last, sha):
    plan = make_plan(create_model(name, meta=True, **kwargs), load_recipe(recipe), name)
    assert plan.rule_matches == matches
    assert (plan.edits[0].eca_path, plan.edits[-1].eca_path) == (first, last)
    assert digest(plan) == sha  # every field of every edit, in order
    assert all(isinstance(e.position, Position) and isinstance(e.gate, Gate) for e in plan.edits)


FROZEN_ERRORS = [
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {stages: [7]}\n",
        "Recipe <recipe>, line 4: rules[0].select.stages: stage index 7 is out of range; resnet18 has 5 stages (feature_info): 0: act1, 1: layer1, 2: layer2, 3: layer3, 4: layer4. Negative indices count from the end.",
    ),
    (
        "resnet18",
        {},
        'version: 1\nrules:\n  - action: insert\n    select: {path: "layer1.0.bn9"}\n',
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert path layer1.0.bn9) matches nothing in resnet18. Paths that nearly match: layer1.0.bn1, layer1.0.bn2, layer3.0.bn2, layer4.0.bn1, layer4.0.bn2. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {class: BatchNorm3d}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert class BatchNorm3d) matches nothing in resnet18. Classes in the model that nearly match: BatchNorm2d. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "seresnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {placement: in-blocks}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert placement in-blocks) matches nothing in seresnet18. No selected block of seresnet18 has an empty attention slot (an 'se' or 'attn' attribute that is None or Identity), so in-blocks has no place to put ECA there; use 'stages' or 'placement: backbone-end' (the eca-after-stages and eca-backbone-end recipes), 'path'/'regex'/'class' selectors, or se-to-eca to replace existing SE blocks. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (replace SE blocks) matches nothing in resnet18. resnet18 has no SE blocks; pick a model with SE blocks (e.g. seresnet50, efficientnet_b0). Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "ecaresnet26t",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (replace SE blocks) matches nothing in ecaresnet26t. ecaresnet26t already has 8 ECA blocks (e.g. at layer1.0.se, class EcaModule), so there is no SE block left to replace; it may be converted already, or be one of timm's ECA models. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {placement: feature-branches}\n",
        "Recipe <recipe>, line 4: rules[0].select.placement: feature-branches needs a features_only model, and resnet18 was built as a classifier. Pass `features_only=True` (and `out_indices` to choose the maps), or build it with timm.create_model(..., features_only=True).",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {stages: [-1]}\n    eca: {kernel_size: 1023}\n",
        "Recipe <recipe>, line 5: rules[0].eca.kernel_size: rule 1 gives resnet18 module 'layer4' (512 channels) an ECA kernel of size 1023 (from kernel_size); the kernel must be between 1 and the channel count, 512. Choose a smaller kernel_size, or a larger gamma or smaller b.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {stages: [0]}\n    eca: {gamma: 0.25, b: 64}\n",
        "Recipe <recipe>, line 5: rules[0].eca: rule 1 gives resnet18 module 'act1' (64 channels) an ECA kernel of size 281 (from gamma 0.25 and b 64); the kernel must be between 1 and the channel count, 64. Choose a smaller kernel_size, or a larger gamma or smaller b.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select:\n      path: layer1\n  - action: insert\n    where: after\n    select:\n      stages: [1]\n",
        "Recipe <recipe>, line 6: rules[1]: rules 1 and 2 both change module 'layer1' of resnet18. Narrow one rule's selector so each module is changed by one rule only.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {path: layer1.0.bn1}\n  - action: insert\n    select: {path: layer1.0.bn1}\n",
        "Recipe <recipe>, line 5: rules[1]: rules 1 and 2 both change module 'layer1.0.bn1' of resnet18. Narrow one rule's selector so each module is changed by one rule only.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {path: layer1.0}\n    eca: {gate: keep}\n",
        "gate: keep cannot reuse the gate of 'layer1.0' (none found); it works on SE blocks with a sigmoid or hard-sigmoid gate. Use 'gate: sigmoid' or 'gate: hard_sigmoid'.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {path: layer2.0.conv1}\n",
        "resnet18 module 'layer2.0.conv1' changes its input's shape (1, 64, 56, 56) to (1, 128, 28, 28); ECA keeps shapes, so it can only replace shape-preserving modules (such as SE blocks).",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {path: fc}\n",
        "resnet18 module 'fc' gives a tensor of shape (1, 1000); ECA needs an NCHW feature map (batch, channels, height, width), so its channel count cannot be known.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {path: global_pool}\n",
        "resnet18 module 'global_pool' gives a tensor of shape (1, 512); ECA needs an NCHW feature map (batch, channels, height, width), so its channel count cannot be known.",
    ),
    (
        "densenet121",
        {"features_only": True},
        "version: 1\nrules:\n  - action: insert\n    select: {path: features_denseblock1}\n",
        "Cannot insert ECA after 'features_denseblock1' (DenseBlock) of densenet121: it runs every child it holds, and so does its parent, so there is nowhere to put an ECA that runs exactly there. Select a module inside it.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {stages: all, blocks: [5]}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert stages all, blocks [5]) matches nothing in resnet18. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {stages: [1], blocks: [3]}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert stages [1], blocks [3]) matches nothing in resnet18. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {regex: 'layer1\\\\.0\\\\.bnx'}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert regex layer1\\\\.0\\\\.bnx) matches nothing in resnet18. Paths that nearly match: layer1.0.bn1, layer1.0.bn2, layer3.0.bn2, layer4.0.bn1, layer4.0.bn2. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {se: true, class: BatchNorm2d}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (replace SE blocks, class BatchNorm2d) matches nothing in resnet18. Classes in the model that nearly match: BatchNorm2d. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: insert\n    select: {placement: in-blocks, path: 'nothing'}\n",
        "Recipe <recipe>, line 3: rules[0]: rule 1 (insert placement in-blocks, path nothing) matches nothing in resnet18. Check the model name and the rule's selector, or mark the rule 'optional: true' if that is expected.",
    ),
    (
        "resnet18",
        {},
        "version: 1\nrules:\n  - action: replace\n    select: {path: layer1.0.bn1}\n  - action: replace\n    optional: true\n    select: {path: layer1.0.bn1}\n",
        "Recipe <recipe>, line 5: rules[1]: rules 1 and 2 both change module 'layer1.0.bn1' of resnet18. Narrow one rule's selector so each module is changed by one rule only.",
    ),
]


@pytest.mark.parametrize("name, kwargs, text, message", FROZEN_ERRORS)
def test_plan_errors_are_word_for_word_what_they_were(name, kwargs, text, message):
    with pytest.raises(RecipeError) as caught:
        make_plan(create_model(name, meta=True, **kwargs), parse_recipe(text), name)
    assert str(caught.value) == message


class Toy(nn.Module):
    """Its final map is made by a function, and ``conv`` already has an ``eca`` child."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv.eca = nn.Identity()
        self.bn = nn.BatchNorm2d(8)

    def forward_features(self, x):
        return self.bn(self.conv(x)) * 2

    def forward(self, x):
        return self.forward_features(x).mean((2, 3))


@pytest.mark.parametrize(
    "select, message",
    [
        ("{path: conv}", "Cannot insert ECA after 'conv': conv already has 'eca'."),
        (
            "{placement: backbone-end}",
            "Recipe <recipe>, line 4: rules[0].select.placement: cannot find the module that produces toy's "
            "final feature map (it may be made by a function, not a module, or the model gives no NCHW map). "
            "Use an insert rule with a 'path' "
            "selector naming the module instead.",
        ),
    ],
)
def test_toy_errors_are_what_they_were(select, message):
    with pytest.raises(RecipeError) as caught:
        make_plan(Toy(), rule(select), "toy")
    assert str(caught.value) == message


def test_insert_before_on_a_toy_is_what_it_was():
    text = "version: 1\nrules:\n  - action: insert\n    where: before\n    select: {path: bn}\n"
    (edit,) = make_plan(Toy(), parse_recipe(text), "toy").edits
    assert edit == Edit.from_dict(
        {
            "path": "bn", "action": "insert", "position": "before", "eca_path": "bn.eca_before",
            "old_class": "torch.nn.modules.batchnorm.BatchNorm2d", "new_class": "timm.layers.eca.EcaModule",
            "channels": 8, "kernel_size": 3, "gate": "sigmoid", "params_before": 0, "params_after": 3, "rule": 0,
        }
    )  # fmt: skip


def test_name_tables_are_keyed_by_the_enums():
    assert INSERT_NAMES == {Position.AFTER: "eca", Position.BEFORE: "eca_before"}
    assert GATE_NAMES["Sigmoid"] is Gate.SIGMOID and GATE_NAMES["Hardsigmoid"] is Gate.HARD_SIGMOID
    assert INSERT_NAMES["after"] == "eca"  # str enums: plain strings still look them up


# 4. does a plan (or a checkpoint's edits) fit a model


def test_a_plan_fits_once(seresnet18):
    model = create_model("seresnet18", meta=True)
    plan = make_plan(model, load_recipe("se-to-eca"), "seresnet18")
    assert find_misfit(model, plan.edits) is None
    apply_plan(model, plan)
    misfit = find_misfit(model, plan.edits)
    assert misfit.edit is plan.edits[0]
    assert misfit.reason == "it is timm.layers.eca.EcaModule, not timm.layers.squeeze_excite.SEModule"
    with pytest.raises(SurgeryError, match="already applied") as caught:
        check_applicable(model, plan)
    assert "at 'layer1.0.se': it is timm.layers.eca.EcaModule" in str(caught.value)


@pytest.mark.parametrize(
    "recipe, reason",
    [
        ("eca-in-blocks", "the slot is not empty: it holds timm.layers.eca.EcaModule"),
        ("eca-after-stages", "'layer2.eca' is taken already"),
    ],
)
def test_filled_slots_and_taken_paths_do_not_fit(recipe, reason):
    model = create_model("resnet18", meta=True)
    plan = make_plan(model, load_recipe(recipe), "resnet18")
    apply_plan(model, plan)
    assert find_misfit(model, plan.edits).reason == reason


def test_misfits_of_edits_from_a_file():
    model = create_model("resnet18", meta=True)
    plan = make_plan(model, load_recipe("eca-after-stages"), "resnet18")
    other = AttnToy()
    edit = plan.edits[0]
    assert find_misfit(other, plan.edits).reason == "there is no module there"
    stray = Edit.from_dict({**edit.to_dict(), "eca_path": "layer1.eca"})
    assert (
        "is in neither the module nor its parent"
        in find_misfit(create_model("resnet18", meta=True), [stray]).reason
    )
    twice = find_misfit(create_model("resnet18", meta=True), [edit, edit])
    assert twice.reason == "a second edit puts an ECA block at 'layer2.eca'"
    slot = Edit.from_dict(
        {**edit.to_dict(), "position": "slot", "path": "layer2.0.attn", "eca_path": "layer2.0.attn"}
    )
    assert (
        find_misfit(create_model("resnet18", meta=True), [slot]).reason
        == "layer2.0 has no attention slot 'attn'"
    )
    inner = Edit.from_dict({**edit.to_dict(), "path": "layer2.0", "eca_path": "layer2.0.eca"})
    swap = Edit.from_dict(
        {**edit.to_dict(), "position": "in-place", "action": "replace", "eca_path": "layer2"}
    )
    assert find_misfit(model, [swap, inner]).reason == "it lies inside 'layer2', which another edit replaces"


# 5. gates


def test_make_eca_takes_a_gate_or_its_value():
    assert type(make_eca(64, gate=Gate.DOUBLE_SIGMOID).gate) is DoubleSigmoid
    assert type(make_eca(64, gate="double_sigmoid").gate) is DoubleSigmoid
    assert type(make_eca(64, gate=Gate.HARD_SIGMOID).gate).__name__.lower() == "hardsigmoid"
    assert type(make_eca(64).gate).__name__ == "Sigmoid"
    with pytest.raises(ValueError, match="Unknown `gate` 'tanh'; choose one of: sigmoid, hard_sigmoid"):
        make_eca(64, gate="tanh")
    assert torch.equal(DoubleSigmoid()(torch.zeros(3)), torch.ones(3))
