"""torchvision models downstream of convert: calibration and heal images normalised as the
builder's weights expect, fit-se on classifiers and on detection/segmentation backbones,
heal through the real CLI (logits, or the backbone's feature maps), and GMACs of a
detection model counted on its backbone."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from cli_helpers import run_fail, run_ok
from heal_inputs import noise_images
from randomised import randomise_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eca_surgery import convert, load_patched, open_patched
from eca_surgery.data import ImageFiles, data_config
from eca_surgery.models import create_model

CLASSIFIER = "torchvision:mobilenet_v3_small"
DETECTOR = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
SEGMENTER = "torchvision:lraspp_mobilenet_v3_large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return noise_images(tmp_path_factory.mktemp("tv") / "images", 4, size=48)


def source_checkpoint(folder: Path, name: str) -> Path:
    """A checkpoint of ``name`` with every weight and BatchNorm statistic randomised (so a
    kept tensor and a reset one, or a fitted kernel and a default one, differ)."""
    torch.manual_seed(0)
    path = folder / (name.partition(":")[2] + ".safetensors")
    model = randomise_(create_model(name))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_data_config_follows_the_builders_default_weights(offline):
    b0 = data_config(create_model("torchvision:efficientnet_b0", meta=True), "torchvision:efficientnet_b0")
    # torchvision's EfficientNet_B0_Weights.DEFAULT: resize 256, crop 224, bicubic, ImageNet's mean
    assert b0["input_size"] == (3, 224, 224) and b0["interpolation"] == "bicubic"
    assert b0["crop_pct"] == pytest.approx(224 / 256) and b0["mean"] == IMAGENET_MEAN
    b1 = data_config(create_model("torchvision:efficientnet_b1", meta=True), "torchvision:efficientnet_b1")
    assert b1["input_size"] == (3, 240, 240) and b1["crop_pct"] == pytest.approx(240 / 255)
    resize = ImageFiles([], b1).transform.transforms[0]
    assert resize.size == 255  # timm's eval transform resizes the short side as torchvision's does
    seg = data_config(create_model(SEGMENTER, meta=True), SEGMENTER)
    assert seg["input_size"] == (3, 520, 520) and seg["crop_pct"] == 1.0 and seg["mean"] == IMAGENET_MEAN
    # detection weights name no transform: the model's own normalisation, at 3x320x320
    ssd = "torchvision:ssdlite320_mobilenet_v3_large"
    assert data_config(create_model(ssd, meta=True), ssd)["mean"] == (0.5, 0.5, 0.5)
    det = data_config(create_model(DETECTOR, meta=True), DETECTOR)
    assert det["input_size"] == (3, 320, 320) and det["mean"] == IMAGENET_MEAN
    # a torchvision model without its name: ImageNet's statistics at its default input size
    unnamed = data_config(create_model(CLASSIFIER, meta=True))
    assert unnamed["input_size"] == (3, 224, 224) and unnamed["std"] == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", [CLASSIFIER, DETECTOR])
def test_fit_se_follows_the_torchvision_model_better_than_default_init(name, images, tmp_path):
    checkpoint = source_checkpoint(tmp_path, name)
    conv = convert(name, "se-to-eca", checkpoint=checkpoint, init="fit-se", calib_data=images, calib_size=4)
    before, after = conv.init["fidelity_default"], conv.init["fidelity"]
    assert before["samples"] == after["samples"] == 4
    assert before["max_abs_diff"] > 1e-3, "the default init must change the outputs for this to test anything"
    assert after["cosine"] > before["cosine"] and after["max_abs_diff"] < before["max_abs_diff"]
    size = "224x224" if name == CLASSIFIER else "320x320"
    assert f"4 images from {str(images)!r} at 3x{size}" == conv.init["calibration"]
    assert ("top1_agreement" in before) == (name == CLASSIFIER)  # a detector's backbone maps: no logits


def heal_cli(patched: Path, images: Path, out: Path, *extra: str, steps: int = 2) -> dict:
    args = ["heal", str(patched), "--data", str(images), "-o", str(out), "--batch-size", "2"]
    return json.loads(run_ok([*args, "--lr", "0.01", "--steps", str(steps), "--json", *extra]))


@pytest.mark.parametrize(
    "name, extra",
    [
        (CLASSIFIER, ["--feature-weight", "1", "--teacher", CLASSIFIER]),
        (DETECTOR, []),
        (SEGMENTER, []),
    ],
)
def test_heal_a_torchvision_model_through_the_cli(name, extra, images, tmp_path):
    checkpoint = source_checkpoint(tmp_path, name)
    patched = convert(name, "se-to-eca", checkpoint=checkpoint).save(tmp_path / "patched.safetensors")
    if "--teacher" in extra:
        extra = [*extra, "--teacher-checkpoint", str(checkpoint)]
    out = tmp_path / "healed.safetensors"
    report = heal_cli(patched, images, out, "--train", "eca", *extra)
    assert report["steps"] == 2
    before, after = load_file(patched), load_file(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    kernels = {f"{e.eca_path}.conv.weight" for e in open_patched(out).plan.edits}
    assert changed and changed <= kernels  # --train eca: only the ECA kernels moved
    assert not load_patched(out).training
    run_ok(["verify", str(out)])


def test_heal_trains_only_the_backbone_of_a_detection_model_and_resumes(images, tmp_path):
    checkpoint = source_checkpoint(tmp_path, DETECTOR)
    patched = convert(DETECTOR, "se-to-eca", checkpoint=checkpoint).save(tmp_path / "patched.safetensors")
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    heal_cli(patched, images, resumed, "--train", "all", steps=1)
    assert heal_cli(patched, images, resumed, "--train", "all", "--resume")["resumed_from_step"] == 1
    heal_cli(patched, images, straight, "--train", "all")
    before, a, b = load_file(patched), load_file(resumed), load_file(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must equal an uninterrupted one"
    changed = {k for k in before if not torch.equal(before[k], b[k])}
    assert changed and all(k.startswith("backbone.body.") for k in changed)
    with safe_open(str(straight), "pt") as f:
        trainable = json.loads(f.metadata()["heal"])["trainable"]
    model = load_patched(straight)  # --train all trains the backbone, nothing the loss does not reach
    assert trainable == sum(1 for n, _ in model.named_parameters() if n.startswith("backbone.body."))


def test_gmacs_of_a_detection_model_are_its_backbones():
    det = json.loads(run_ok(["inspect", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "-r", "se-to-eca",
                             "--json"]))  # fmt: skip
    assert det["macs_scope"] == "backbone.body" and "macs_error" not in det
    assert det["macs_before"] is not None and 0 < det["macs_after"] < det["macs_before"]
    assert det["input_size"] == [3, 320, 320]
    text = run_ok(["inspect", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "-r", "se-to-eca"])
    assert "GMACs of the backbone backbone.body" in " ".join(text.split())
    seg = json.loads(run_ok(["inspect", SEGMENTER, "-r", "se-to-eca", "--json"]))
    assert seg["macs_before"] > seg["macs_after"] > 0 and "macs_scope" not in seg  # counted whole


def test_identity_init_keeps_a_segmentation_backbone_exactly(images, tmp_path):
    recipe = tmp_path / "insert.yaml"
    recipe.write_text(
        "version: 1\nname: insert\nrules:\n  - action: insert\n    where: after\n"
        "    select:\n      path: [backbone.6, backbone.12]\n"
    )
    checkpoint = source_checkpoint(tmp_path, SEGMENTER)
    conv = convert(SEGMENTER, recipe, checkpoint=checkpoint, init="identity", calib_data=images, calib_size=2)
    assert conv.init["edits"] == ["backbone.6", "backbone.12"]
    assert conv.init["fidelity"]["max_abs_diff"] == 0.0  # the backbone's maps, bit for bit
    assert conv.init["calibration"].endswith("at 3x520x520")


def test_heal_refuses_an_eca_outside_a_segmentation_backbone(images, tmp_path):
    """heal distils the backbone's maps: an ECA in the head would never train, so it is refused."""
    recipe = tmp_path / "head.yaml"
    recipe.write_text(
        "version: 1\nrules:\n  - action: insert\n    where: after\n    select:\n      path: ['classifier.cbr']\n"
    )
    checkpoint = source_checkpoint(tmp_path, SEGMENTER)
    patched = convert(SEGMENTER, recipe, checkpoint=checkpoint).save(tmp_path / "p.safetensors")
    message = run_fail(
        ["heal", str(patched), "--data", str(images), "-o", str(tmp_path / "h.safetensors")], tmp_path
    )
    assert "the ECA at 'classifier.cbr.eca' lies outside it" in message
