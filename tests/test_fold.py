"""fit-se with the fold: a per-channel factor folded into the norm before an SE block or the
convolution after it, exact where it is applied, reported where it is not."""

import copy
import json

import pytest
import timm
import torch
from cli_helpers import run_ok
from randomised import randomise_
from timm.layers import SEModule
from torch import nn

from eca_surgery import convert
from eca_surgery.data import calibration_batches
from eca_surgery.init import channel_scale_r2

SMALL = {"num_classes": 10, "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
QUICK = {"init": "fit-se", "calib_size": 8, "check": False, "flops": False}


def random_se_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every tensor, then give each SE's last layer a large per-channel bias, so its
    gates differ by channel (what an ECA alone cannot carry)."""
    randomise_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SEModule):
                m.fc2.bias.copy_(2 * torch.randn(m.fc2.bias.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def seresnet():
    return random_se_(timm.create_model("seresnet18", **SMALL))


def inputs(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_norm_fold_equals_the_unfolded_model_with_an_explicit_factor(seresnet):
    original = {k: v.clone() for k, v in seresnet.state_dict().items()}
    folded = convert(seresnet, "se-to-eca", **QUICK)
    plain = convert(seresnet, "se-to-eca", fold=False, **QUICK)
    blocks = folded.init["blocks"]
    assert [b["fold"]["path"] for b in blocks] == [b["path"].replace(".se", ".bn2") for b in blocks]
    assert {b["fold"]["kind"] for b in blocks} == {"norm"} and all(b["fold_reason"] is None for b in blocks)
    # fold=False: every original tensor bit for bit; the fold: only the recorded ones changed
    changed = {t for b in blocks for t in b["fold"]["tensors"]}
    for key, value in original.items():
        if ".se." in key:
            continue  # replaced
        assert torch.equal(plain.model.state_dict()[key], value), key
        same = torch.equal(folded.model.state_dict()[key], value)
        assert same == (key not in changed), key
    # independently: the factor is the ratio of the norm's weights, and the bias carries it too
    handles = []
    for b in blocks:
        bn, bn0 = folded.model.get_submodule(b["fold"]["path"]), seresnet.get_submodule(b["fold"]["path"])
        factor = bn.weight / bn0.weight
        assert torch.allclose(bn.bias, factor * bn0.bias, rtol=1e-5, atol=1e-7)
        eca = plain.model.get_submodule(b["path"])
        eca.conv.weight.copy_(folded.model.get_submodule(b["path"]).conv.weight)
        scale = factor.view(1, -1, 1, 1)
        handles.append(eca.register_forward_pre_hook(lambda m, a, s=scale: (a[0] * s,)))
    x = inputs(7)
    expected = plain.model(x)
    for h in handles:
        h.remove()
    assert torch.allclose(folded.model(x), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_conv_fold_on_efficientnet_is_exact_and_improves_the_scales():
    model = random_se_(timm.create_model("test_efficientnet", num_classes=10))
    folded = convert(model, "se-to-eca", **QUICK)
    plain = convert(model, "se-to-eca", fold=False, **QUICK)
    blocks = folded.init["blocks"]
    # the expansion norm is followed by SiLU: the factor goes into the projection instead
    assert [b["fold"]["path"] for b in blocks] == [b["path"].replace(".se", ".conv_pwl") for b in blocks]
    handles = []
    for b in blocks:
        w, w0 = (m.get_submodule(b["fold"]["path"]).weight for m in (folded.model, model))
        ratio = (w / w0)[..., 0, 0]  # (out, in): one factor per input channel
        assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-4)
        eca = plain.model.get_submodule(b["path"])
        eca.conv.weight.copy_(folded.model.get_submodule(b["path"]).conv.weight)
        scale = ratio[0].view(1, -1, 1, 1)
        handles.append(eca.register_forward_hook(lambda m, a, out, s=scale: out * s))
        assert b["scale_r2"] >= b["scale_r2_unfolded"]
    x = inputs(3, size=64)
    expected = plain.model(x)
    for h in handles:
        h.remove()
    assert torch.allclose(folded.model(x), expected, rtol=1e-4, atol=1e-5)


class Unfoldable(nn.Module):
    """SE fed by a ReLU (not a norm) and feeding a residual sum (not a module); and SE fed by a
    norm whose output is also added to the SE's output (a functional use hooks cannot see)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.se1 = SEModule(16, rd_ratio=0.5)
        self.bn = nn.BatchNorm2d(16)
        self.se2 = SEModule(16, rd_ratio=0.5)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        x = self.se1(x) + x
        y = self.bn(x)
        y = self.se2(y) + y
        return self.head(y.mean((2, 3)))


@torch.no_grad()
def test_blocks_without_an_exact_fold_are_reported_and_left_alone():
    model = random_se_(Unfoldable())
    folded = convert(model, "se-to-eca", **QUICK)
    plain = convert(model, "se-to-eca", fold=False, **QUICK)
    first, second = folded.init["blocks"]
    assert first["fold"] is None and "act (ReLU)" in first["fold_reason"]
    assert "feeds no module" in first["fold_reason"]
    # the trace finds bn, but the numeric check sees the residual use and undoes the fold
    assert second["fold"] is None and "changed the model's output" in second["fold_reason"]
    for b in (first, second):
        assert b["scale_r2"] == b["scale_r2_unfolded"]
    a, p = folded.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], p[k]) for k in a)


class Foldable(nn.Module):
    """conv -> bn -> SE -> conv: both folds exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.se = SEModule(32, rd_ratio=0.25)
        self.proj = nn.Conv2d(32, 8, 1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.se(self.bn(self.conv(x)))).mean((2, 3)))


@torch.no_grad()
def test_scale_r2_with_the_fold_beats_the_plain_fit_and_is_measured_again_on_the_same_inputs():
    model = random_se_(Foldable())
    folded = convert(model, "se-to-eca", **QUICK)
    (block,) = folded.init["blocks"]
    assert block["fold"]["kind"] == "norm" and block["fold"]["path"] == "bn"
    assert block["scale_r2"] > 0.9 > block["scale_r2_unfolded"]
    # channel_scale_r2 reads the factor back from the two models: the same figure on the same inputs
    batches, _ = calibration_batches(model, None, 8, seed=0)  # what convert calibrated on
    (measured,) = channel_scale_r2(model, folded.model, batches)
    assert measured.fold == "norm" and measured.samples == 8 and measured.channels == 32
    assert measured.r2 == pytest.approx(block["scale_r2"], abs=1e-4)
    plain = convert(model, "se-to-eca", fold=False, **QUICK)
    (unfolded,) = channel_scale_r2(model, plain.model, batches)
    assert unfolded.fold is None and unfolded.r2 == pytest.approx(block["scale_r2_unfolded"], abs=1e-4)
    held_out = channel_scale_r2(model, folded.model, [inputs(9, 16)])
    assert held_out[0].r2 > unfolded.r2


@torch.no_grad()
def test_a_grouped_consumer_folds_exactly():
    model = random_se_(Foldable())
    model.bn = nn.Sequential(model.bn, nn.SiLU())  # the norm is no longer the SE's input
    folded = convert(model, "se-to-eca", **QUICK)
    (block,) = folded.init["blocks"]
    assert block["fold"]["kind"] == "conv" and block["fold"]["path"] == "proj"
    twin = copy.deepcopy(folded.model)
    twin.proj.weight.copy_(model.proj.weight)
    (measured,) = channel_scale_r2(model, folded.model, [inputs(1, 8)])
    factor = (folded.model.proj.weight / model.proj.weight).view(2, 4, 16).transpose(1, 2).reshape(32, 4)
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), rtol=1e-4)
    twin.se.register_forward_hook(lambda m, a, out: out * factor[:, 0].view(1, -1, 1, 1))
    x = inputs(2)
    assert torch.allclose(folded.model(x), twin(x), rtol=1e-4, atol=1e-6) and measured.fold == "conv"


@pytest.mark.parametrize(
    "name, args",
    [
        ("seresnet18", ["--model-arg", "num_classes=10", "--model-arg", 'pretrained_cfg_overlay={"input_size": [3, 32, 32]}']),
        ("test_efficientnet", []),
        ("torchvision:mobilenet_v3_small", []),
    ],
)  # fmt: skip
def test_cli_convert_fit_se_folds_and_the_file_verifies(name, args, tmp_path):
    out = tmp_path / "fold.safetensors"
    common = ["convert", name, "-r", "se-to-eca", "--init", "fit-se", "--calib-size", "4", *args]
    report = json.loads(run_ok(common + ["-o", str(out), "--json"]))
    blocks = report["init"]["blocks"]
    assert blocks and all(b["fold"] is not None for b in blocks)
    assert all(-1e9 < b["scale_r2"] <= 1 and b["scale_r2_unfolded"] <= 1 for b in blocks)
    checked = json.loads(run_ok(["verify", str(out), "--json"]))
    assert checked["finite"] if "finite" in checked else checked
    plain = json.loads(run_ok(common + ["-o", str(tmp_path / "plain.safetensors"), "--no-fold", "--json"]))
    for b in plain["init"]["blocks"]:
        assert b["fold"] is None and b["fold_reason"] == "not asked (no fold)"
        assert b["scale_r2"] == b["scale_r2_unfolded"]
