"""Full SE coverage, FLOPs, the zoo scan and timm-native export."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok, run_usage_error
from randomised import assert_same_tensors, has_buffers, randomise_
from safetensors.torch import load_file, save_file

import eca_surgery
from eca_surgery.flops import count_macs
from eca_surgery.models import create_model
from eca_surgery.recipe import load_recipe
from eca_surgery.surgery import convert


def test_macs_match_timm_model_cards():
    # timm's cards: resnet50 4.1 GMACs, efficientnet_b0 0.39 GMACs at 224
    assert round(count_macs(create_model("resnet50", meta=True)) / 1e9, 1) == 4.1
    assert round(count_macs(create_model("efficientnet_b0", meta=True)) / 1e9, 2) == 0.39


def test_inspect_and_convert_report_macs(tmp_path):
    report = json.loads(run_ok(["inspect", "seresnet18", "-r", "se-to-eca", "--json"]))
    assert report["input_size"] == [3, 224, 224]
    timm_eca = timm.create_model("resnet18", block_args=dict(attn_layer="eca"))
    assert report["macs_after"] == count_macs(timm_eca)
    assert report["macs_after"] < report["macs_before"]
    converted = json.loads(
        run_ok(["convert", "seresnet18", "-r", "se-to-eca", "-o", str(tmp_path / "m.safetensors"), "--json"])
    )
    assert (converted["macs_before"], converted["macs_after"]) == (
        report["macs_before"],
        report["macs_after"],
    )


def test_scan_lists_se_models_with_savings():
    report = json.loads(run_ok(["scan", "seresnet1*", "--json"]))
    rows = {r["model"]: r for r in report["models"]}
    assert {"seresnet18", "seresnet101", "seresnet152"} <= set(rows)
    assert report["failed"] == 0
    r18 = rows["seresnet18"]
    assert r18["se_blocks"] == {"SEModule": 8}
    assert r18["params_after"] == sum(
        p.numel() for p in timm.create_model("resnet18", block_args={"attn_layer": "eca"}).parameters()
    )
    assert r18["saving"] == r18["params_before"] - r18["params_after"] > 0
    savings = [r["saving"] for r in report["models"]]
    assert savings == sorted(savings, reverse=True)
    table = run_ok(["scan", "seresnet1*", "--sort", "name", "--no-flops"])
    assert "seresnet18" in table and "with SE blocks" in table


def test_scan_reports_models_without_se_and_bad_patterns(tmp_path):
    report = json.loads(run_ok(["scan", "resnet18", "--json"]))
    assert report["with_se"] == 0 and report["without_se"] == 1
    assert "No timm model matches" in run_fail(["scan", "no_such_model_*"], tmp_path)
    assert "--sort" in run_usage_error(["scan", "resnet18", "--sort", "size"], tmp_path)


def test_timm_dir_export_loads_in_plain_timm(tmp_path):
    source = randomise_(timm.create_model("seresnet18")).state_dict()
    ckpt, out, tdir = tmp_path / "src.safetensors", tmp_path / "m.safetensors", tmp_path / "seresnet18-eca"
    save_file(source, ckpt)
    report = json.loads(
        run_ok(
            ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out)]
            + ["--timm-dir", str(tdir), "--json"]
        )
    )
    assert report["timm_native"] == {"model": "seresnet18", "kwargs": {"block_args": {"attn_layer": "eca"}}}
    assert sorted(p.name for p in tdir.iterdir()) == sorted(
        ["config.json", "model.safetensors", "README.md", ".eca-surgery-export"]
    )
    # the export holds exactly the -o file's tensors, and every source tensor outside the SE blocks
    exported, converted = load_file(tdir / "model.safetensors"), load_file(out)
    assert has_buffers(exported) and exported.keys() == converted.keys()
    assert_same_tensors(converted, exported)
    assert_same_tensors({k: v for k, v in source.items() if ".se." not in k}, exported)
    x = torch.randn(2, 3, 224, 224)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, timm, torch
        model = timm.create_model("local-dir:{tdir}", pretrained=True).eval()
        assert "eca_surgery" not in sys.modules
        with torch.no_grad():
            torch.save(model(torch.load("{tmp_path / "x.pt"}")), "{tmp_path / "y.pt"}")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    with torch.no_grad():
        expected = eca_surgery.load_patched(out)(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_timm_dir_refused_where_timm_cannot_build_the_variant(tmp_path):
    msg = run_fail(["convert", "regnety_002", "-r", "se-to-eca", "--timm-dir", str(tmp_path / "d")], tmp_path)
    assert "timm cannot build this ECA variant" in msg


@pytest.mark.parametrize("name", ["efficientnet_b0", "seresnext26d_32x4d"])
def test_native_variants_match_timm(name):
    result = convert(name, load_recipe("se-to-eca"))
    assert result.native is not None
    randomise_(result.model)  # no zero-initialised norm may hide a difference
    native = timm.create_model(result.native["model"], **result.native["kwargs"]).eval()
    assert sum(p.numel() for p in native.parameters()) == result.plan.params_after
    native.load_state_dict(result.model.state_dict(), strict=True)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(native(x), result.model(x), rtol=0, atol=0)


def _kernel(channels):
    t = int(abs((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


# (model, SE class) per the timm census; the parameter delta is computed here
# independently: sum of ECA kernel sizes minus every parameter of every SE module
MUST_CONVERT = [
    ("efficientnet_b0", "SqueezeExcite"),
    ("mobilenetv3_large_100", "SqueezeExcite"),
    ("regnety_032", "SEModule"),
    ("rexnet_100", "SEModule"),
    ("ese_vovnet19b_dw", "EffectiveSEModule"),
    ("legacy_seresnet18", "SEModule"),
    ("hgnet_tiny", "EseModule"),
]


@pytest.mark.parametrize("name,se_class", MUST_CONVERT)
def test_every_se_class_converts(name, se_class):
    original = timm.create_model(name).eval()
    se = {
        p: m
        for p, m in original.named_modules()
        if type(m).__name__ == se_class
        and any(n in type(m).__module__ for n in ("squeeze_excite", "efficientnet", "senet", "hgnet"))
    }
    assert se
    removed = sum(p.numel() for m in se.values() for p in m.parameters())
    first = {p: next(iter(m.parameters())) for p, m in se.items()}  # the squeeze layer: (r or C, C, 1, 1)
    added = sum(_kernel(w.shape[1]) for w in first.values())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected_shape = original(x).shape
    result = convert(name, load_recipe("se-to-eca"))
    assert sorted(e.path for e in result.plan.edits) == sorted(se)
    assert result.plan.params_delta == added - removed
    model = result.model
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(p.numel() for p in original.parameters()) + added - removed
    )
    assert not any(type(m).__name__ == se_class for m in model.modules())
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected_shape and torch.isfinite(out).all()


def test_gate_keep_reuses_hard_sigmoid():
    text = "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n    eca: {gate: keep}\n"
    from eca_surgery.plan import make_plan
    from eca_surgery.recipe import parse_recipe

    plan = make_plan(create_model("mobilenetv3_large_100", meta=True), parse_recipe(text), "m")
    assert {e.gate for e in plan.edits} == {"hard_sigmoid"}
    default = make_plan(create_model("mobilenetv3_large_100", meta=True), load_recipe("se-to-eca"), "m")
    assert {e.gate for e in default.edits} == {"sigmoid"}


def test_unknown_se_like_modules_are_reported():
    from torch import nn

    from eca_surgery.detect import find_se_blocks, find_unknown_se_like

    class HomeMadeSE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.reduce = nn.Conv2d(c, c // 4, 1)
            self.expand = nn.Conv2d(c // 4, c, 1)
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(self.expand(self.reduce(x.mean((2, 3), keepdim=True))))

    model = nn.Sequential(nn.Conv2d(3, 32, 3), HomeMadeSE(32), nn.ReLU())
    assert find_se_blocks(model) == []
    assert find_unknown_se_like(model) == [f"1 ({HomeMadeSE.__module__}.{HomeMadeSE.__qualname__})"]
    # global context, split attention and selective kernel blocks are not SE
    for name in ("resnest14d", "skresnet18", "gcresnext26ts"):
        meta = create_model(name, meta=True)
        assert find_se_blocks(meta) == [] and find_unknown_se_like(meta) == []


@pytest.mark.parametrize("name", ["ese_vovnet19b_dw", "seresnext26ts"])
def test_more_native_variants_match_timm_in_params_and_keys(name):
    result = convert(name, load_recipe("se-to-eca"), dry_run=True)
    assert result.native is not None
    native = create_model(result.native["model"], meta=True, **result.native["kwargs"])
    assert sum(p.numel() for p in native.parameters()) == result.plan.params_after
