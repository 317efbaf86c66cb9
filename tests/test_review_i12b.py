"""A hostile review of traced stages, the probe and the backbone of torchvision models
(issue 12): a user's own module named ``backbone``, modules called with keyword arguments
only, a quantizable model's QuantStub, models whose forward fails in any way, and a model
without parameters. Each must give the right stages or a clean error, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_ok
from torch import nn

from eca_surgery import SurgeryError, convert, inspect, parse_recipe
from eca_surgery.flops import count_macs
from eca_surgery.locate import backbone_path
from eca_surgery.models import create_model
from eca_surgery.stages import traced_stages


def _insert(path: str, where: str = "after"):
    return parse_recipe(
        f"version: 1\nrules:\n- action: insert\n  where: {where}\n  select: {{path: {path}}}\n"
    )


def _eca_paths(result) -> list[str]:
    return [e.eca_path for e in result.plan.edits]


class StemAndBackbone(nn.Module):
    """A user's classifier whose ``backbone`` takes the stem's 16 channels, not the image."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.backbone = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.backbone(self.stem(x)).mean((2, 3)))


def test_a_users_module_named_backbone_runs_inside_the_whole_model():
    # it was taken for torchvision's detection backbone and run alone on the image: stages,
    # backbone-end and even a plain path insert failed ("Place ECA inside its backbone")
    model = StemAndBackbone().eval()
    assert backbone_path(model) == ""
    assert traced_stages(model) == ["stem", "backbone.1", "backbone.2"]
    assert _eca_paths(convert(model, "eca-backbone-end", flops=False)) == ["backbone.2.eca"]
    result = convert(model, _insert("backbone.1"), flops=False)
    assert _eca_paths(result) == ["backbone.1.eca"]
    assert result.model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_a_subclass_of_a_torchvision_segmentation_model_keeps_its_backbone():
    model = create_model("torchvision:lraspp_mobilenet_v3_large", meta=True, weights_backbone=None)
    model.__class__ = type("MySegmenter", (type(model),), {"__module__": "my_project.models"})
    assert backbone_path(model) == "backbone"
    assert traced_stages(model)[-1] == "backbone.16"


class KeywordCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.b = nn.Conv2d(8, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        x = self.b(input=self.a(x))  # keyword only: a pre-hook sees no positional argument
        return {"out": self.c(x)}


def test_a_module_called_with_keywords_only_stays_on_the_traced_main_path():
    assert traced_stages(KeywordCalls()) == ["a", "b", "c"]  # was ['a']: the path broke at b
    result = convert(KeywordCalls().eval(), "eca-after-stages", flops=False)
    assert _eca_paths(result) == ["a.eca", "b.eca", "c.eca"]
    assert result.model(torch.zeros(1, 3, 32, 32))["out"].shape == (1, 8, 4, 4)


def test_a_quantstub_is_no_stage_so_quantizable_models_stage_like_their_float_twins():
    # QuantStub hands on the image itself (3x224x224): an ECA there would gate RGB channels
    quantizable = create_model("torchvision:quantized_mobilenet_v3_large", meta=True)
    plain = create_model("torchvision:mobilenet_v3_large", meta=True)
    assert traced_stages(quantizable) == traced_stages(plain) == [f"features.{i}" for i in (1, 3, 6, 12, 16)]
    report = json.loads(
        run_ok(["inspect", "torchvision:quantized_mobilenet_v3_large", "-r", "eca-after-stages", "--json"])
    )
    assert [e["eca_path"] for e in report["edits"]] == [
        "features.6.eca",
        "features.12.eca",
        "features.16.eca",
    ]


class Failing(nn.Module):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.exc = exc

    def forward(self, x):
        self.a(x)
        raise self.exc


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x, y):
        return self.a(x) + y


@pytest.mark.parametrize(
    "model",
    [
        Failing(ValueError("bad input")),
        Failing(AssertionError("wrong size")),
        Failing(KeyError("targets")),
        TwoInputs(),
    ],
    ids=["ValueError", "AssertionError", "KeyError", "two-inputs"],
)
def test_a_model_whose_forward_fails_in_any_way_is_a_clean_error_when_probed(model):
    # the probe caught only RuntimeError/NotImplementedError: the rest reached the user raw
    model.train()
    for run in (lambda: convert(model, _insert("a"), flops=False), lambda: inspect(model, _insert("a"))):
        with pytest.raises(SurgeryError, match="Cannot run .* to measure the modules"):
            run()
    with pytest.raises(SurgeryError, match="Cannot trace the stages"):
        traced_stages(model)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class NoParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(x)


def test_a_model_without_parameters_is_traced_counted_and_refused_cleanly():
    # the probe and the MAC count took next(model.parameters()): a bare StopIteration
    assert traced_stages(NoParameters()) == ["pool"]
    assert count_macs(NoParameters()) == 0
    assert inspect(NoParameters()).params == 0
    with pytest.raises(SurgeryError, match="has no parameters"):
        convert(NoParameters(), _insert("pool"), flops=False)


def test_backbone_end_of_a_features_only_timm_model_is_its_last_returned_map():
    # taken for a model without forward_features, it got the last feature_info stage
    # (blocks.6), which runs after the last map it returns (blocks.2): an ECA no output sees
    args = ["inspect", "efficientnet_b0", "--out-indices", "1,2", "-r", "eca-backbone-end", "--json"]
    report = json.loads(run_ok(args))
    assert [e["eca_path"] for e in report["edits"]] == ["blocks.2.eca"]
