"""torchvision models by name: ``torchvision:NAME`` (a bare name stays timm) through inspect,
convert, verify and load_patched; meta builds (RegNet included), the model kwargs a builder
may get, source weights from a state_dict or the torch hub cache (never the network), and
checkpoints that record and rebuild ``torchvision:NAME`` from the file alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from cli_helpers import run_ok
from randomised import assert_same_tensors, randomise_
from safetensors import safe_open
from safetensors.torch import save_file

from eca_surgery import CheckpointError, SurgeryError, convert, inspect, load_patched
from eca_surgery.models import DENSE_INPUT_SIZE, Source, create_model, input_size, resolve_name


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_regnet_builds_on_meta_like_on_cpu():
    meta = create_model("torchvision:regnet_y_400mf", meta=True)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert _shapes(meta) == _shapes(create_model("torchvision:regnet_y_400mf"))


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        ("torchvision:efficientnet_b0", 5_288_548, 4_652_084),
        ("torchvision:regnet_y_400mf", 4_344_144, 3_676_192),
    ],
)
def test_inspect_by_name(name, before, after):
    report = json.loads(run_ok(["inspect", name, "-r", "se-to-eca", "--json"]))
    assert (report["params_before"], report["params_after"]) == (before, after)


def test_mobilenet_v3_large_converts_verifies_and_reloads_from_the_file(tmp_path):
    out = tmp_path / "mnv3.safetensors"
    args = ["convert", "torchvision:mobilenet_v3_large", "--recipe", "se-to-eca", "--output", str(out)]
    report = json.loads(run_ok([*args, "--json"]))
    assert (report["params_before"], report["params_after"], len(report["edits"])) == (
        5_483_032,
        3_970_786,
        8,
    )
    assert report["model"] == "torchvision:mobilenet_v3_large"
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["model"] == "torchvision:mobilenet_v3_large"
        stored = {k: f.get_tensor(k) for k in f.keys()}
    json.loads(run_ok(["verify", str(out), "--json"]))
    assert_same_tensors(load_patched(out).state_dict(), stored)


def test_a_state_dict_checkpoint_keeps_every_tensor_outside_the_se_blocks(tmp_path):
    model = torchvision.models.mobilenet_v3_small()
    randomise_(model)
    source = tmp_path / "mnv3s.pth"
    torch.save(model.state_dict(), source)
    out = tmp_path / "out.safetensors"
    result = convert("torchvision:mobilenet_v3_small", "se-to-eca", checkpoint=source, output=out)
    se_paths = [e.path + "." for e in result.plan.edits]
    with safe_open(str(out), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(se_paths))}
    assert kept and all(torch.equal(written[k], v) for k, v in kept.items())
    assert len(written) - len(kept) == len(result.plan.edits)  # one ECA kernel each


def test_detection_dry_run_counts_parameters():
    args = ["convert", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--dry-run", "-r", "se-to-eca"]
    report = json.loads(run_ok([*args, "--json"]))
    assert (report["params_before"], report["params_after"]) == (19_410_754, 17_898_508)


def test_input_sizes():
    assert input_size(create_model("torchvision:mobilenet_v3_small", meta=True)) == (3, 224, 224)
    assert input_size(create_model("torchvision:lraspp_mobilenet_v3_large", meta=True)) == DENSE_INPUT_SIZE


def test_names_resolve_bare_names_stay_timm():
    assert resolve_name("seresnet18").full == "seresnet18"
    assert resolve_name("timm:seresnet18").full == "seresnet18"
    assert Source.of("timm:seresnet18", {}).name == "seresnet18"
    assert inspect("timm:seresnet18").model_name == "seresnet18"
    assert resolve_name("torchvision:regnet_y_400mf").library == "torchvision"


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("torchvision:mobilenet_v3_larg", "torchvision:mobilenet_v3_large"),
        ("torchvision:seresnet18", "torchvision has no such builder"),
        ("seresnet1", "seresnet18"),
        ("keras:mobilenet", "torchvision builder"),
    ],
)
def test_unknown_names_have_hints(name, hint):
    with pytest.raises(SurgeryError, match=hint):
        inspect(name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": "DEFAULT"}, "torchvision gets only these kwargs"),
        ({"weights_backbone": "DEFAULT"}, "never downloads"),
        ({"num_classes": 0}, "num_classes"),
        ({"features_only": True}, "torchvision gets only"),
        ({"progress": True}, "torchvision gets only"),
    ],
)
def test_torchvision_kwargs_are_allow_listed(kwargs, match):
    with pytest.raises(SurgeryError, match=match):
        inspect("torchvision:mobilenet_v3_small", **kwargs)


def test_model_args_reach_the_builder():
    args = ["inspect", "torchvision:mobilenet_v3_small", "--model-arg", "num_classes=10", "--json"]
    report = json.loads(run_ok(args))
    assert report["params_before"] == sum(
        p.numel() for p in torchvision.models.mobilenet_v3_small(num_classes=10).parameters()
    )
    assert inspect("torchvision:lraspp_mobilenet_v3_large", weights_backbone=None).params == 3_221_538


def _hub_file(monkeypatch, tmp_path: Path, arch: str) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def test_pretrained_reads_only_the_hub_cache(monkeypatch, tmp_path):
    cached = _hub_file(monkeypatch, tmp_path, "mobilenet_v3_small")
    with pytest.raises(CheckpointError, match="checkpoint=FILE") as err:
        convert("torchvision:mobilenet_v3_small", "se-to-eca", pretrained=True, dry_run=True)
    assert str(cached) in str(err.value)
    model = torchvision.models.mobilenet_v3_small()
    randomise_(model)
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    result = convert("torchvision:mobilenet_v3_small", "se-to-eca", pretrained=True, check=False, flops=False)
    assert str(cached) in result.source
    assert torch.equal(result.model.classifier[3].weight, model.classifier[3].weight)


def test_crafted_torchvision_names_are_refused(tmp_path):
    out = tmp_path / "small.safetensors"
    convert("torchvision:mobilenet_v3_small", "se-to-eca", output=out, check=False, flops=False)
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    for name in ("torchvision:not_a_model", "torchvision:", "torchvision:os.system", "timm:x:y"):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata=metadata | {"model": name})
        with pytest.raises(CheckpointError, match="not a timm model name"):
            load_patched(bad)
    with pytest.raises(CheckpointError, match="torchvision gets only"):
        save_file(tensors, str(bad), metadata=metadata | {"model_kwargs": '{"weights": "DEFAULT"}'})
        load_patched(bad)


def test_detection_converts_and_keeps_boxes_labels_scores(tmp_path):
    out = tmp_path / "frcnn.safetensors"
    result = convert("torchvision:fasterrcnn_mobilenet_v3_large_fpn", "se-to-eca", output=out)
    assert result.check["finite"] and len(result.check["output_shape"]) == 3  # boxes, labels, scores
    # the whole model cannot be counted (data-dependent ops): its backbone is, and says so
    assert result.macs["macs_scope"] == "backbone.body" and result.macs["macs_before"] > 0
    json.loads(run_ok(["verify", str(out), "--json"]))
    with torch.no_grad():
        (detections,) = load_patched(out)(torch.rand(1, 3, 320, 320))
    assert set(detections) == {"boxes", "labels", "scores"}
    assert detections["boxes"].shape[1:] == (4,)


def test_segmentation_keeps_its_out_map():
    result = convert("torchvision:lraspp_mobilenet_v3_large", "se-to-eca")
    assert (result.plan.params_before, result.plan.params_after) == (3_221_538, 1_709_292)
    assert result.check["output_shape_at_default_size"] == [[1, 21, 320, 320]]
    with torch.no_grad():
        assert result.model(torch.rand(1, 3, 96, 96))["out"].shape == (1, 21, 96, 96)


def test_timm_dir_is_refused_for_torchvision(tmp_path):
    with pytest.raises(SurgeryError, match="not a timm model"):
        convert("torchvision:mobilenet_v3_small", "se-to-eca", timm_dir=tmp_path / "tv")
    result = convert("torchvision:mobilenet_v3_small", "se-to-eca", dry_run=True)
    assert result.native is None and result.source == "random init (torchvision, weights=None)"
