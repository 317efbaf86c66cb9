"""ECA placed where the article says: in blocks, after stages, at the backbone end, on feature branches."""

import copy

import pytest
import timm
import torch
from randomised import assert_same_tensors, randomise_
from safetensors.torch import load_file
from timm.layers import EcaModule

import eca_surgery
from eca_surgery.apply import apply_plan, count_eca_calls
from eca_surgery.eca import eca_kernel_size
from eca_surgery.models import create_model
from eca_surgery.plan import make_plan
from eca_surgery.recipe import load_recipe, parse_recipe
from eca_surgery.surgery import convert


def plan_for(name, text, **kwargs):
    return make_plan(create_model(name, meta=True, **kwargs), parse_recipe(text), name)


def insert(select, where=None):
    where_line = f"    where: {where}\n" if where else ""
    return f"version: 1\nrules:\n  - action: insert\n{where_line}    select: {select}\n"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_eca_in_blocks_is_timms_eca_resnet(name, tmp_path):
    result = convert(name, load_recipe("eca-in-blocks"))
    randomise_(result.model)  # timm's init leaves BatchNorm statistics at 0 and 1: nothing to tell apart
    timm_eca = timm.create_model(name, block_args=dict(attn_layer="eca")).eval()
    assert result.plan.params_after == n_params(timm_eca) == n_params(result.model)
    out = eca_surgery.save_patched(result.model, tmp_path / "m.safetensors", result.plan)
    assert_same_tensors(result.model.state_dict(), load_file(out))
    timm_eca.load_state_dict(load_file(out), strict=True)
    loaded = eca_surgery.load_patched(out)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(timm_eca(x), loaded(x))
        assert torch.equal(loaded(x), result.model(x))


def test_eca_after_stages_on_resnet50():
    source = timm.create_model("resnet50").eval()
    original = {k: v.clone() for k, v in source.state_dict().items()}
    plan = make_plan(source, load_recipe("eca-after-stages"), "resnet50")
    expected_k = sum(eca_kernel_size(c) for c in (512, 1024, 2048))  # layer2..layer4 outputs
    assert plan.params_delta == expected_k == 17
    assert [e.eca_path for e in plan.edits] == ["layer2.eca", "layer3.eca", "layer4.eca"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = source(x).shape
    apply_plan(source, plan)
    state = source.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert set(state) - set(original) == {
        "layer2.eca.conv.weight",
        "layer3.eca.conv.weight",
        "layer4.eca.conv.weight",
    }
    assert count_eca_calls(source, x) == {"layer2.eca": 1, "layer3.eca": 1, "layer4.eca": 1}
    with torch.no_grad():
        assert source(x).shape == before


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_eca_backbone_end_uses_num_features(name):
    result = convert(name, load_recipe("eca-backbone-end"))
    (edit,) = result.plan.edits
    assert edit.channels == result.model.num_features
    ecas = [m for m in result.model.modules() if isinstance(m, EcaModule)]
    assert len(ecas) == 1
    seen = []
    ecas[0].register_forward_hook(lambda m, a, y: seen.append(y))
    with torch.no_grad():
        feats = result.model.forward_features(torch.randn(1, 3, 224, 224))
    assert len(seen) == 1 and torch.equal(seen[0], feats)  # the ECA output is the final feature map


def test_eca_feature_pyramid_on_features_only_resnet():
    kwargs = dict(features_only=True, out_indices=[1, 2, 3, 4])
    plain = timm.create_model("resnet34", **kwargs).eval()
    result = convert("resnet34", load_recipe("eca-feature-pyramid"), **kwargs)
    model = result.model
    ecas = {p: m for p, m in model.named_modules() if isinstance(m, EcaModule)}
    assert sorted(ecas) == ["layer1.eca", "layer2.eca", "layer3.eca", "layer4.eca"]
    outputs = {}
    for path, m in ecas.items():
        m.register_forward_hook(lambda m, a, y, path=path: outputs.__setitem__(path, y))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model(x)
        expected = plain(x)
    assert [f.shape for f in feats] == [f.shape for f in expected]
    for feat, path in zip(feats, sorted(ecas), strict=True):
        assert feat is outputs[path]  # each returned map is its own ECA's output
        assert ecas[path].conv.kernel_size[0] == eca_kernel_size(feat.shape[1])


# every bundled recipe on at least two families, each inserted ECA executed exactly once
BUNDLED_CASES = [
    ("se-to-eca", "seresnet18", {}),
    ("se-to-eca", "efficientnet_b0", {}),
    ("se-to-eca", "regnety_002", {}),
    ("eca-in-blocks", "resnet18", {}),
    ("eca-in-blocks", "efficientnet_lite0", {}),
    ("eca-in-blocks", "regnetx_002", {}),
    ("eca-after-stages", "resnet18", {}),
    ("eca-after-stages", "convnext_atto", {}),
    ("eca-after-stages", "regnetx_002", {}),
    ("eca-after-stages", "densenet121", {}),
    ("eca-after-stages", "efficientnet_b0", {}),
    ("eca-backbone-end", "resnet18", {}),
    ("eca-backbone-end", "convnext_atto", {}),
    ("eca-backbone-end", "regnetx_002", {}),
    ("eca-feature-pyramid", "resnet18", {"features_only": True}),
    ("eca-feature-pyramid", "efficientnet_b0", {"features_only": True, "out_indices": [2, 3, 4]}),
    ("eca-feature-pyramid", "convnext_atto", {"features_only": True}),
]


@pytest.mark.parametrize("recipe,name,kwargs", BUNDLED_CASES, ids=[f"{r}-{n}" for r, n, _ in BUNDLED_CASES])
def test_every_inserted_eca_runs(recipe, name, kwargs, tmp_path):
    result = convert(name, load_recipe(recipe), **kwargs)
    x = torch.randn(1, 3, 128, 128)
    calls = count_eca_calls(result.model, x)
    assert sorted(calls) == sorted(e.eca_path for e in result.plan.edits)
    assert calls and set(calls.values()) == {1}, calls
    # reloading re-applies the recipe from the checkpoint's metadata, hooks included
    out = eca_surgery.save_patched(result.model, tmp_path / "m.safetensors", result.plan, model_kwargs=kwargs)
    loaded = eca_surgery.load_patched(out)
    assert count_eca_calls(loaded, x) == calls
    with torch.no_grad():
        a, b = result.model(x), loaded(x)
    for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)  # same weights; kernels may pick other paths


# (model, selected module, where, the module that must receive the ECA's output)
POSITION_CASES = [
    ("resnet18", "layer2", "after", "layer3"),  # a Sequential child: the ECA ends it
    ("resnet18", "layer2", "before", "layer2.0"),  # ... or starts it
    ("resnet18", "layer2.0", "after", "layer2.1"),  # a block: run from hooks
    ("resnet18", "layer2.0", "before", "layer2.0.conv1"),
    ("densenet121", "features.denseblock2", "after", "features.transition2"),  # beside it in a Sequential
    ("densenet121", "features.denseblock2", "before", "features.denseblock2"),
    ("regnetx_002", "s2", "after", "s3"),  # beside it, in a module that is not a Sequential
    ("regnetx_002", "s2", "before", "s2.b1"),
]


@pytest.mark.parametrize(
    "name,select,where,consumer", POSITION_CASES, ids=[f"{n}-{s}-{w}" for n, s, w, _ in POSITION_CASES]
)
def test_inserted_eca_sits_where_the_recipe_says(name, select, where, consumer):
    """``where: after``: the ECA's input is what the selected module output (in the unpatched
    model) and its output is what comes next; ``where: before``: its input is the selected
    module's input and its output feeds the module's work. Weights and buffers are random, so
    no tensor is trivially equal to another."""
    original = randomise_(timm.create_model(name)).eval()
    model = copy.deepcopy(original)
    plan = make_plan(model, parse_recipe(insert(f"{{path: {select}}}", where)), name)
    (edit,) = plan.edits
    assert edit.position == where
    apply_plan(model, plan)
    seen = {}

    def record(into: str, out: str | None = None):
        """A hook that keeps a copy of the input (and output) and changes nothing."""

        def hook(module, args, *output):
            seen[into] = args[0].detach().clone()
            if out:
                seen[out] = output[0].detach().clone()

        return hook

    hooks = [
        original.get_submodule(select).register_forward_hook(record("selected_in", "selected_out")),
        model.get_submodule(edit.eca_path).register_forward_hook(record("eca_in", "eca_out")),
        model.get_submodule(consumer).register_forward_pre_hook(record("next_in")),
    ]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        original(x)
        model(x)
    for h in hooks:
        h.remove()
    expected = seen["selected_out" if where == "after" else "selected_in"]
    other = seen["selected_in" if where == "after" else "selected_out"]
    assert expected.shape != other.shape or not torch.equal(expected, other)
    assert seen["eca_in"].shape == expected.shape and torch.equal(seen["eca_in"], expected)
    assert not torch.allclose(seen["eca_out"], seen["eca_in"])  # the ECA changes what it is given
    assert torch.equal(seen["next_in"], seen["eca_out"])


def test_original_keys_and_tensors_untouched_by_inserts():
    model = timm.create_model("densenet121").eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    text = insert("{stages: all}") + "  - action: insert\n    where: before\n    select: {stages: [1, 2]}\n"
    plan = make_plan(model, parse_recipe(text), "densenet121")
    apply_plan(model, plan)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert sorted(set(state) - set(original)) == sorted(f"{e.eca_path}.conv.weight" for e in plan.edits)
    assert "features.denseblock1_eca" in {e.eca_path for e in plan.edits}  # beside the DenseBlock
    assert "features.denseblock1_eca_before" in {e.eca_path for e in plan.edits}
    assert set(count_eca_calls(model, torch.randn(1, 3, 96, 96)).values()) == {1}


# selectors


@pytest.mark.parametrize(
    "select,expected",
    [
        ('{path: "layer1.*"}', ["layer1.0.eca", "layer1.1.eca"]),
        ('{path: "layer*.1.bn2"}', [f"layer{i}.1.bn2.eca" for i in range(1, 5)]),
        ('{path: "layer4.**.bn1"}', ["layer4.0.bn1.eca", "layer4.1.bn1.eca"]),
        ('{path: ["layer1.0.bn1", "layer2.0.bn1"]}', ["layer1.0.bn1.eca", "layer2.0.bn1.eca"]),
        ('{regex: "layer[23]\\\\.0\\\\.conv2"}', ["layer2.0.conv2.eca", "layer3.0.conv2.eca"]),
        ('{regex: "layer4"}', ["layer4.eca"]),  # full match, not search
        ('{class: BasicBlock, path: "layer2.*"}', ["layer2.0.eca", "layer2.1.eca"]),
        ('{class: timm.models.resnet.BasicBlock, path: "layer3.*"}', ["layer3.0.eca", "layer3.1.eca"]),
        ("{stages: [0, -1]}", ["act1.eca", "layer4.eca"]),
        ("{stages: all}", ["act1.eca", "layer1.eca", "layer2.eca", "layer3.eca", "layer4.eca"]),
        ("{stages: [1], blocks: all}", ["layer1.0.eca", "layer1.1.eca"]),
        ("{stages: [2, 3], blocks: last}", ["layer2.1.eca", "layer3.1.eca"]),
        ("{stages: -1, blocks: [0]}", ["layer4.0.eca"]),
        ("{blocks: [-1]}", [f"layer{i}.1.eca" for i in range(1, 5)]),
        ("{placement: backbone-end}", ["layer4.eca"]),
        ("{placement: in-blocks, stages: [-1]}", ["layer4.0.se", "layer4.1.se"]),
        ("{placement: in-blocks, blocks: last}", [f"layer{i}.1.se" for i in range(1, 5)]),
    ],
)
def test_selectors_on_resnet18(select, expected):
    plan = plan_for("resnet18", insert(select))
    assert sorted(e.eca_path for e in plan.edits) == sorted(expected)
    assert plan.rule_matches == (len(expected),)


def test_se_selector_and_class_selector_replace():
    se = plan_for(
        "seresnet18", "version: 1\nrules:\n  - action: replace\n    select: {se: true, path: 'layer1.**'}\n"
    )
    assert [e.path for e in se.edits] == ["layer1.0.se", "layer1.1.se"]
    by_class = plan_for(
        "seresnet18", "version: 1\nrules:\n  - action: replace\n    select: {class: SEModule}\n"
    )
    assert len(by_class.edits) == 8 and by_class.params_delta < se.params_delta < 0
    assert all(e.old_class.endswith("SEModule") for e in by_class.edits)


def test_insert_before_and_eca_options():
    text = (
        "version: 1\nrules:\n  - action: insert\n    where: before\n    select: {stages: [-1]}\n"
        "    eca: {kernel_size: 9, gate: hard_sigmoid}\n"
    )
    (edit,) = plan_for("resnet18", text).edits
    assert (edit.eca_path, edit.channels, edit.kernel_size, edit.gate) == (
        "layer4.eca_before",
        256,
        9,
        "hard_sigmoid",
    )
    gamma = plan_for("resnet18", insert("{stages: [-1]}") + "    eca: {gamma: 1, b: 0}\n")
    assert gamma.edits[0].kernel_size == eca_kernel_size(512, gamma=1, b=0) == 9


def test_plan_counts_matches_per_rule_and_mixes_actions():
    text = (
        "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n"
        "  - action: insert\n    select: {placement: backbone-end}\n"
        "  - action: insert\n    select: {path: nothing.here}\n    optional: true\n"
    )
    plan = plan_for("seresnet18", text)
    assert plan.rule_matches == (8, 1, 0)
    assert plan.edits[-1].eca_path == "layer4.eca"


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.act = torch.nn.ReLU()  # shared: runs twice
        self.unused = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.act(self.conv(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    "path,message",
    [("fc", "NCHW"), ("unused", "never runs"), ("act", "runs 2 times")],
)
def test_insertion_fails_clearly_where_channels_cannot_be_known(path, message):
    from eca_surgery.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        make_plan(Toy(), parse_recipe(insert(f"{{path: {path}}}")), "toy")
    plan = make_plan(Toy(), parse_recipe(insert("{path: conv}")), "toy")
    assert plan.edits[0].channels == 8
