"""Stages and backbone-end on models without timm's feature_info: torchvision classifiers,
the backbones of its detection and segmentation models, and a user's own CNN. Stages are
traced (the last module of each feature-map size along the backbone's main path); every
inserted ECA must run exactly once, and every original tensor must stay bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_fail, run_ok
from randomised import assert_same_tensors, randomise_
from torch import nn

from eca_surgery import RecipeError, SurgeryError, convert, load_patched, parse_recipe
from eca_surgery.apply import count_eca_calls
from eca_surgery.models import create_model
from eca_surgery.stages import model_stages, traced_stages

DENSE = {"weights_backbone": None}


@pytest.mark.parametrize(
    ("name", "kwargs", "stages"),
    [
        ("resnet50", {}, ["relu", "layer1", "layer2", "layer3", "layer4"]),
        ("mobilenet_v3_large", {}, [f"features.{i}" for i in (1, 3, 6, 12, 16)]),
        ("efficientnet_b0", {}, [f"features.{i}" for i in (1, 2, 3, 5, 8)]),
        ("regnet_y_400mf", {}, ["stem", *(f"trunk_output.block{i}" for i in range(1, 5))]),
        ("convnext_tiny", {}, [f"features.{i}" for i in (1, 3, 5, 7)]),
        ("maxvit_t", {}, ["stem", *(f"blocks.{i}" for i in range(4))]),
        # dilated (output stride 16): the last two stages keep one size
        ("lraspp_mobilenet_v3_large", DENSE, [f"backbone.{i}" for i in (1, 3, 6, 16)]),
        ("fasterrcnn_mobilenet_v3_large_fpn", DENSE, [f"backbone.body.{i}" for i in (1, 3, 6, 12, 16)]),
    ],
)
def test_traced_stages_of_torchvision_models(name, kwargs, stages):
    model = create_model(f"torchvision:{name}", meta=True, **kwargs)
    assert model_stages(model).how == "traced"
    assert traced_stages(model) == stages


def test_timm_models_keep_their_feature_info_stages():
    staging = model_stages(create_model("resnet50", meta=True))
    assert (staging.how, staging.paths) == ("feature_info", ["act1", "layer1", "layer2", "layer3", "layer4"])


class TinyCNN(nn.Module):
    """A user's CNN: no feature_info, a reused activation, a residual add, a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.same = nn.Conv2d(16, 16, 3, 1, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.act(self.down(x))  # act runs twice: never a stage itself
        x = x + self.same(x)
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def test_a_users_cnn_gets_traced_stages_without_shared_modules():
    # each size's run ends at the shared act, which would run an ECA twice: the stage is the
    # last module of the run that runs once (stem; same, whose output the residual add takes)
    assert traced_stages(TinyCNN()) == ["stem", "same"]


def _eca_paths(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m).__name__ == "EcaModule"]


def test_after_stages_on_a_torchvision_classifier_runs_each_eca_once_and_keeps_every_tensor(tmp_path):
    source = randomise_(create_model("torchvision:mobilenet_v3_small")).eval()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    result = convert(source, "eca-after-stages", flops=False)
    expected = [f"features.{i}.eca" for i in (3, 8, 12)]
    assert [e.eca_path for e in result.plan.edits] == expected
    x = torch.randn(2, 3, 96, 96)
    assert count_eca_calls(result.model.eval(), x) == dict.fromkeys(expected, 1)
    kept = {k: v for k, v in result.model.state_dict().items() if ".eca." not in k}
    assert_same_tensors(kept, before)
    with torch.no_grad():
        assert not torch.allclose(result.model(x), source(x))  # the ECAs act
    path = result.save(tmp_path / "m.safetensors")
    reloaded = load_patched(path, model=create_model("torchvision:mobilenet_v3_small")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_stages_of_a_detection_backbone_keep_boxes_labels_scores():
    source = randomise_(create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", **DENSE)).eval()
    result = convert(source, "eca-after-stages", flops=False)
    expected = [f"backbone.body.{i}.eca" for i in (6, 12, 16)]
    assert [e.eca_path for e in result.plan.edits] == expected
    images = [torch.rand(3, 160, 200)]
    assert count_eca_calls(result.model.eval(), images) == dict.fromkeys(expected, 1)
    with torch.no_grad():
        (out,) = result.model(images)
    assert set(out) == {"boxes", "labels", "scores"}


def test_backbone_end_of_a_segmentation_model_keeps_its_out_map():
    source = randomise_(create_model("torchvision:lraspp_mobilenet_v3_large", **DENSE)).eval()
    result = convert(source, "eca-backbone-end", flops=False)
    assert [e.eca_path for e in result.plan.edits] == ["backbone.16.eca"]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out, ref = result.model(x)["out"], source(x)["out"]
    assert out.shape == ref.shape == (1, 21, 128, 128)
    assert not torch.allclose(out, ref)


def test_cli_after_stages_on_torchvision_names_the_traced_stages():
    report = json.loads(run_ok(["inspect", "torchvision:regnet_y_400mf", "-r", "eca-after-stages", "--json"]))
    assert [e["path"] for e in report["edits"]] == [f"trunk_output.block{i}" for i in (2, 3, 4)]


def test_a_stage_index_out_of_range_lists_the_traced_stages(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nrules:\n  - action: insert\n    where: after\n    select:\n      stages: [9]\n"
    )
    message = run_fail(["inspect", "torchvision:resnet18", "-r", str(recipe)], tmp_path)
    assert "has 5 stages (traced): 0: relu, 1: layer1" in message


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 224 * 224, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_backbone_end_on_a_model_without_feature_maps_says_so():
    with pytest.raises(RecipeError, match="cannot find the module that produces"):
        convert(MLP(), "eca-backbone-end", flops=False)


def test_inserting_outside_a_detection_backbone_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nrules:\n  - action: insert\n    where: after\n    select:\n"
        "      path: ['backbone.fpn.layer_blocks.0']\n"
    )
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    message = run_fail(["inspect", name, "-r", str(recipe), "--model-arg", "weights_backbone=None"], tmp_path)
    assert "Place ECA inside its backbone ('backbone.body')" in message
    with pytest.raises(SurgeryError, match="backbone"):
        convert(create_model(name, meta=True, **DENSE), parse_recipe(recipe.read_text()), dry_run=True)


def test_a_subclass_of_a_dense_torchvision_model_is_dense_everywhere():
    """One test (``models.dense_task``) decides: input size, backbone, card task and shape check."""
    from torchvision.models.segmentation.lraspp import LRASPP

    from eca_surgery.card import task_of
    from eca_surgery.checks import shape_module
    from eca_surgery.locate import backbone_path
    from eca_surgery.models import DENSE_INPUT_SIZE, dense_task, input_size

    base = create_model("torchvision:lraspp_mobilenet_v3_large", meta=True, **DENSE)

    class MyLRASPP(LRASPP):
        pass

    mine = MyLRASPP.__new__(MyLRASPP)
    mine.__dict__.update(base.__dict__)
    for model in (base, mine):
        assert dense_task(model) == "segmentation" and input_size(model) == DENSE_INPUT_SIZE
        assert backbone_path(model) == "backbone" and task_of(model) == "image-segmentation"
        assert shape_module(model) is model  # only detection models compare their backbone
    detector = create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", meta=True, **DENSE)
    assert dense_task(detector) == "detection" and shape_module(detector) is detector.backbone
    assert dense_task(create_model("torchvision:resnet18", meta=True)) is None
