"""SE detection beyond timm: torchvision's SqueezeExcitation built in, a user's own SE class
taught with ``register_se``, and unknown SE-like modules reported with a register hint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from randomised import assert_same_tensors, randomise_
from rich.console import Console
from torch import nn
from torchvision.models import detection, quantization, segmentation

import eca_surgery
from eca_surgery import eca_kernel_size, load_recipe, make_plan
from eca_surgery.apply import apply_plan
from eca_surgery.detect import find_adapter, find_se_blocks, find_unknown_se_like, register_se, unregister_se
from eca_surgery.errors import RecipeError, SurgeryError
from eca_surgery.init import NormalEquations, fittable, record_se, set_fitted
from eca_surgery.recipe import parse_recipe
from eca_surgery.report import inspect_report, render_inspect
from eca_surgery.surgery import Inspection

KEEP = parse_recipe(
    "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n    eca: {gate: keep}\n"
)


def on_meta(build):
    with torch.device("meta"):
        return build()


# (builder, SE blocks, params before, params after, gate kept by `gate: keep`)
TORCHVISION = {
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, 8, 5_483_032, 3_970_786, "hard_sigmoid"),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 16, 5_288_548, 4_652_084, "sigmoid"),
    "lraspp_mobilenet_v3_large": (
        lambda: segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
        8,
        3_221_538,
        1_709_292,
        "hard_sigmoid",
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None),
        8,
        19_410_754,
        17_898_508,
        "hard_sigmoid",
    ),
    "quantizable_mobilenet_v3_large": (
        lambda: quantization.mobilenet_v3_large(weights=None, quantize=False),
        8,
        5_483_032,
        3_970_786,
        "hard_sigmoid",
    ),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_se_models_plan_on_meta(name):
    build, blocks, before, after, kept = TORCHVISION[name]
    model = on_meta(build)
    plan = make_plan(model, load_recipe("se-to-eca"), name)
    assert (len(plan.edits), plan.params_before, plan.params_after) == (blocks, before, after)
    se = {b.path: b for b in find_se_blocks(model)}
    assert [e.path for e in plan.edits] == list(se)
    for edit in plan.edits:  # the paper's rule on each SE's own channel count (fc1's input)
        assert edit.channels == se[edit.path].module.fc1.in_channels
        assert edit.kernel_size == eca_kernel_size(edit.channels)
        assert edit.gate == "sigmoid"
    assert {e.gate for e in make_plan(model, KEEP, name).edits} == {kept}


def test_regnet_y_400mf_built_for_real():  # torchvision's RegNet builders do not build on meta
    model = torchvision.models.regnet_y_400mf()
    plan = make_plan(model, load_recipe("se-to-eca"), "regnet_y_400mf")
    assert (plan.params_before, plan.params_after) == (4_344_144, 3_676_192)
    assert {e.gate for e in make_plan(model, KEEP, "regnet_y_400mf").edits} == {"sigmoid"}


def outside(state: dict[str, torch.Tensor], paths: list[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in paths)}


@torch.no_grad()
def test_apply_keeps_every_tensor_outside_the_se_blocks():
    model = randomise_(torchvision.models.mobilenet_v3_small()).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    shape = model(x).shape
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, KEEP, "mobilenet_v3_small")
    apply_plan(model, plan)
    paths = [e.path for e in plan.edits]
    assert find_se_blocks(model) == [] and len(paths) == 9
    assert_same_tensors(outside(original, paths), model.state_dict())
    out = model(x)
    assert out.shape == shape and torch.isfinite(out).all()


def fit(model: nn.Module, plan, batches):
    """fit-se the way surgery._initialise runs it: record on the original, apply, solve."""
    edits = fittable(model, plan)
    problems, targets, _ = record_se(model, edits, batches)
    apply_plan(model, plan)
    return problems, set_fitted(model, edits, problems, targets)


@torch.no_grad()
def test_fit_se_records_torchvision_pre_gate_targets():
    model = randomise_(torchvision.models.mobilenet_v3_small()).eval()
    batches = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = make_plan(model, KEEP, "mobilenet_v3_small")
    path = plan.edits[0].path
    se = model.get_submodule(path)
    expected = NormalEquations(plan.edits[0].kernel_size)  # independent: the SE's own layers
    handle = se.register_forward_pre_hook(
        lambda m, a: expected.add(a[0].mean((2, 3)), m.fc2(m.activation(m.fc1(m.avgpool(a[0])))).flatten(1))
    )
    problems, fits = fit(model, plan, batches)
    handle.remove()
    assert torch.allclose(problems[path].gram, expected.gram) and torch.allclose(
        problems[path].rhs, expected.rhs
    )
    assert {f.target for f in fits} == {"pre-gate output"} and {f.samples for f in fits} == {4}
    assert all(0 <= f.rel_error < 10 for f in fits)


# -- a user's own SE class -------------------------------------------------------------------


class MySE(nn.Module):
    """An SE block derived from no known class."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        self.act = nn.ReLU()
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.squeeze(x.mean((2, 3), keepdim=True)))))


class MySubSE(MySE):
    pass


class TinyNet(nn.Module):
    def __init__(self, se: type[nn.Module] = MySE) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block1 = se(16)
        self.down = nn.Sequential(nn.Conv2d(16, 64, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = se(64)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


HINT = 'eca_surgery.register_se(MySE, channels="squeeze", gate="gate")'


@pytest.fixture
def registered():
    register_se(MySE, channels="squeeze", gate="gate")
    yield
    unregister_se(MySE)


def test_unknown_se_class_is_reported_with_a_register_hint():
    unregister_se(MySE)
    model = TinyNet()
    assert find_se_blocks(model) == []
    qualname = f"{MySE.__module__}.{MySE.__qualname__}"
    assert find_unknown_se_like(model) == [f"block1 ({qualname})", f"block2 ({qualname})"]
    with pytest.raises(RecipeError) as error:
        make_plan(model, load_recipe("se-to-eca"), "TinyNet")
    assert "block1 (MySE), block2 (MySE)" in str(error.value) and HINT in str(error.value)


def test_inspect_report_lists_unknown_se_like_modules():
    unregister_se(MySE)
    model = TinyNet()
    inspection = Inspection("TinyNet", [], 0, None, {}, find_unknown_se_like(model))
    report = inspect_report(inspection)
    assert report["unknown_se_like"] == find_unknown_se_like(model)
    console = Console(record=True, width=200)
    render_inspect(console, report)
    text = console.export_text()
    assert "2 module(s) look like SE blocks" in text
    assert 'eca_surgery.register_se(MySE, channels="<squeeze layer>", gate="<gate attribute>")' in text


def test_inspect_of_a_timm_model_reports_no_unknown_se():
    report = inspect_report(eca_surgery.inspect("seresnet18"))
    assert report["unknown_se_like"] == [] and len(report["se_blocks"]) == 8


@torch.no_grad()
def test_registered_class_converts_and_fits(registered):
    model = randomise_(TinyNet()).eval()
    blocks = find_se_blocks(model)
    assert [(b.path, b.channels, b.gate) for b in blocks] == [
        ("block1", 16, nn.Sigmoid),
        ("block2", 64, nn.Sigmoid),
    ]
    assert find_unknown_se_like(model) == []
    plan = make_plan(model, load_recipe("se-to-eca"), "TinyNet")
    assert [(e.path, e.kernel_size) for e in plan.edits] == [("block1", 3), ("block2", 3)]
    assert plan.params_after == plan.params_before - sum(
        sum(p.numel() for p in b.module.parameters()) for b in blocks
    ) + sum(e.kernel_size for e in plan.edits)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _, fits = fit(model, plan, [x])
    assert [f.target for f in fits] == ["pre-gate output"] * 2 and all(f.samples == 4 for f in fits)
    assert_same_tensors(outside(original, ["block1", "block2"]), model.state_dict())
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_registration_by_functions_replaces_and_is_exact_by_class(registered):
    register_se(MySE, channels=lambda m: m.expand.weight.shape[0], gate=None)  # replaces the entry
    model = TinyNet()
    assert [(b.channels, b.gate) for b in find_se_blocks(model)] == [(16, None), (64, None)]
    with pytest.raises(RecipeError, match="gate: keep cannot reuse"):
        make_plan(model, KEEP, "TinyNet")
    plan = make_plan(model, load_recipe("se-to-eca"), "TinyNet")
    with pytest.raises(SurgeryError, match="needs the gate module"):
        record_se(model, fittable(model, plan), [torch.randn(1, 3, 8, 8)])
    register_se(MySE, channels="squeeze", gate=lambda m: m.gate)
    assert [b.gate for b in find_se_blocks(model)] == [nn.Sigmoid, nn.Sigmoid]
    assert find_se_blocks(TinyNet(MySubSE)) == []  # a subclass needs its own registration


def test_registering_a_builtin_class_replaces_it_until_unregistered():
    se = torchvision.ops.SqueezeExcitation
    register_se(se, channels="fc1", gate=None)
    try:
        assert find_adapter(on_meta(lambda: se(32, 8))).gate_from is None
    finally:
        unregister_se(se)
    assert (
        find_se_blocks(on_meta(lambda: nn.Sequential(se(32, 8, scale_activation=nn.Hardsigmoid))))[0].gate
        is nn.Hardsigmoid
    )


def test_a_registration_that_does_not_fit_the_module_says_so(registered):
    register_se(MySE, channels="act", gate="gate")
    with pytest.raises(SurgeryError, match="does not fit how it is registered"):
        find_se_blocks(TinyNet())
    register_se(MySE, channels=lambda m: "16", gate="gate")
    with pytest.raises(SurgeryError, match="not a positive int"):
        find_se_blocks(TinyNet())


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("MySE",), {"channels": "fc1"}, TypeError, "subclass of torch.nn.Module"),
        ((int,), {"channels": "fc1"}, TypeError, "subclass of torch.nn.Module"),
        ((nn.Sequential,), {"channels": "0"}, ValueError, "torch.nn layer"),
        ((MySE,), {"channels": 3}, TypeError, "`channels` must be"),
        ((MySE,), {"channels": None}, TypeError, "`channels` must be"),
        ((MySE,), {"channels": nn.Conv2d}, TypeError, "`channels` must be"),
        ((MySE,), {"channels": ""}, ValueError, "not an attribute name"),
        ((MySE,), {"channels": "fc 1"}, ValueError, "not an attribute name"),
        ((MySE,), {"channels": "squeeze", "gate": 5}, TypeError, "`gate` must be"),
        ((MySE,), {"channels": "squeeze", "gate": "a..b"}, ValueError, "not an attribute name"),
        ((MySE, "squeeze"), {}, TypeError, "positional"),
    ],
)
def test_register_se_checks_its_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        register_se(*args, **kwargs)
    assert find_adapter(MySE(8)) is None


def test_register_se_is_public():
    assert eca_surgery.register_se is register_se and "register_se" in eca_surgery.__all__


def test_the_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## SE blocks beyond timm", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope: dict = {}
    try:
        exec(compile(block, "README.md (SE blocks beyond timm)", "exec"), scope)
    finally:
        if "MySE" in scope:
            unregister_se(scope["MySE"])
    assert "# 8 5483032 3970786" in block
    assert (len(scope["plan"].edits), scope["plan"].params_after) == (8, 3_970_786)
    assert find_se_blocks(scope["net"]) == [] and scope["net"](torch.randn(1, 3, 8, 8)).shape == (1, 32, 6, 6)
