"""The patched model's MACs are derived from the original's pass (replaced modules off, each
ECA's convolution on) instead of a second counted pass; the derivation must equal counting."""

from __future__ import annotations

import copy

import pytest

from eca_surgery import load_recipe, make_plan, parse_recipe
from eca_surgery.apply import apply_plan
from eca_surgery.checks import meta_pass
from eca_surgery.models import create_model
from eca_surgery.surgery import macs_before_after

KEEP = "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n    eca: {gate: keep}\n"
CASES = [
    ("seresnet18", "se-to-eca"),
    ("efficientnet_b0", "se-to-eca"),
    ("mobilenetv3_small_050", KEEP),
    ("regnety_002", "se-to-eca"),
    ("resnet18", "eca-after-stages"),
    ("resnet18", "eca-in-blocks"),
    ("resnet18", "eca-backbone-end"),
    ("torchvision:mobilenet_v3_small", "se-to-eca"),
    ("torchvision:lraspp_mobilenet_v3_large", "se-to-eca"),
    ("torchvision:regnet_y_400mf", "eca-after-stages"),
]


@pytest.mark.parametrize(("name", "recipe"), CASES, ids=[f"{n}-{r[:12]}" for n, r in CASES])
def test_derived_macs_equal_a_counted_pass(name, recipe):
    meta = create_model(name, meta=True)
    plan = make_plan(meta, parse_recipe(recipe) if "\n" in recipe else load_recipe(recipe), name)
    counted = meta_pass(apply_plan(copy.deepcopy(meta), plan), check=False).macs
    report = macs_before_after(meta, plan)
    assert report["macs_after"] == counted
    assert report["macs_before"] > report["macs_after"] or "se-to-eca" not in recipe


@pytest.mark.parametrize("name", ["seresnet18", "efficientnet_b0", "torchvision:mobilenet_v3_small"])
def test_shape_only_norms_change_neither_shapes_nor_macs_and_are_undone(name, monkeypatch):
    import contextlib

    import torch

    import eca_surgery.checks as checks

    meta = create_model(name, meta=True).eval()
    fast = meta_pass(meta)
    monkeypatch.setattr(checks, "shape_only_norms", lambda model: contextlib.nullcontext())
    slow = meta_pass(meta)
    assert (fast.shape, fast.macs, fast.modules) == (slow.shape, slow.macs, slow.modules)
    assert not any("forward" in m.__dict__ for m in meta.modules())  # every stand-in removed
    monkeypatch.undo()
    real = create_model(name).eval()
    with torch.no_grad(), checks.shape_only_norms(real):
        assert not any("forward" in m.__dict__ for m in real.modules())  # real weights: left alone
