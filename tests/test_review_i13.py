"""Hostile review of issue 13 (export, half precision, model cards): each test pins a fix.

Kept fast: tiny modules where the library's helpers can be driven directly, one small
resnet18 checkpoint for the CLI, no ONNX export of a real model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_fail, run_ok
from torch import nn

import eca_surgery.export as export_module
from eca_surgery import ExportOptions, ParityError, SurgeryError, convert, export_checkpoint
from eca_surgery.card import ModelCard, hub_loading, timm_loading
from eca_surgery.export import ExportError


class _Images(nn.Module):
    """A tiny CNN whose forward's argument is not called ``x`` (as in torchvision's detection
    and segmentation models: ``images``, ``input``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(images).mean((2, 3)))


class _DataDependent(_Images):
    """A model with data-dependent control flow, which torch.export cannot trace."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.conv(images)
        return y[y > 0].sum().reshape(1) if int((y > 0).sum()) > 3 else y.sum().reshape(1)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    """A resnet18 checkpoint with ECA after its stages (random weights)."""
    folder = tmp_path_factory.mktemp("resnet")
    return convert("resnet18", "eca-after-stages", num_classes=4).save(folder / "r.safetensors")


def test_dynamic_shapes_do_not_assume_the_argument_is_called_x():
    # the dict {"x": ...} made every torchvision segmentation/detection model fail its trace
    traced = export_module._trace(_Images().eval(), (3, 32, 32), static=False, need=True)
    assert traced.program is not None and [d.name for d in traced.dynamic] == ["batch", "height", "width"]


def test_a_failed_trace_prints_no_graph_and_gives_the_right_hint(capfd):
    # torch.export printed the whole graph on stderr (2,300 lines for ssdlite) before the error
    with pytest.raises(ExportError, match="data-dependent control flow") as caught:
        export_module._trace(_DataDependent().eval(), (3, 16, 16), static=True, need=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "static=True" not in str(caught.value)  # already static: not suggested again


def test_a_height_or_width_of_1_is_refused_when_dynamic(resnet, tmp_path):
    # torch.export silently specialises a size of 1: the file took only 1x1 inputs, exit 0
    args = ["export", str(resnet), "--torch-export", str(tmp_path / "m.pt2"), "--input-size", "3x1x64"]
    message = run_fail(args, tmp_path, tmp_path / "m.pt2")
    assert "height or width of 1" in message and "--static" in message


def test_a_model_with_non_finite_outputs_is_refused_with_the_reason():
    # an fp16 overflow read "the export differs by up to nan ... pass a larger atol"
    class Overflows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1e4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale * self.scale

    model = Overflows().half()
    with pytest.raises(ExportError, match="not finite.*float16 overflows") as caught:
        export_module.compare(model, lambda x: [x * 1e6], [torch.ones(1, 3, 4, 4)], 1e-3)
    assert "--dtype" not in str(caught.value) and "`dtype='float32'`" in str(caught.value)


def test_an_opset_the_dynamo_exporter_did_not_write_counts_as_its_failure(tmp_path):
    # --opset 13 wrote an opset-18 file and exited 0
    pytest.importorskip("onnxscript")
    model, x = _Images().eval(), torch.randn(1, 3, 16, 16)
    traced = export_module._Traced(None, (), failure=None)
    options = ExportOptions(static=True, opset=13)
    with pytest.raises(ExportError, match="wrote opset 18, not the 13 asked"):
        export_module.produce_onnx(model, x, traced, options, tmp_path / "m.onnx")
    legacy = ExportOptions(static=True, opset=13, legacy=True)
    exporter, notes = export_module.produce_onnx(model, x, traced, legacy, tmp_path / "m.onnx")
    assert exporter == "torchscript" and "not the 13 asked" in notes[0]
    assert export_module.file_opset(tmp_path / "m.onnx") == 13


def test_a_hub_folder_needs_no_onnx_package(resnet, tmp_path, monkeypatch):
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails
    report = json.loads(run_ok(["export", str(resnet), "--hub-dir", str(tmp_path / "hub"), "--json"]))
    assert report["ok"] and (tmp_path / "hub" / "model.safetensors").is_file()


def test_the_bfloat16_onnx_refusal_names_both_dtypes_as_flags(tmp_path):
    path = tmp_path / "b.safetensors"
    convert("resnet18", "eca-after-stages", num_classes=4, output=path, dtype="bfloat16")
    work = tmp_path / "out"
    work.mkdir()
    message = run_fail(["export", str(path), "--onnx", str(work / "m.onnx")], work)
    assert "--dtype float16" in message and "--dtype float32" in message and "`" not in message


@pytest.mark.parametrize(
    "folder",
    ['my "best" model', "line\nbreak", "back\\slash", "fence```x", "not-utf8-\udcff", "emoji-\U0001f600"],
)
def test_the_loading_code_names_the_folder_exactly(folder):
    # the folder was pasted into the code between double quotes: a quote broke it (or injected
    # code), a non-UTF-8 name crashed the card's write with a traceback
    plan = convert("resnet18", "eca-after-stages", dry_run=True, flops=False).plan
    for loading, expected in (
        (hub_loading(folder, {}), f"{folder}/model.safetensors"),
        (timm_loading(folder), f"local-dir:{folder}"),
    ):
        card = ModelCard(plan, "src", loading).to_markdown()
        card.encode("utf-8")  # writable as UTF-8
        code = card.split("## How to load\n\n", 1)[1]
        fence = code.split("python\n", 1)[0]
        body = code.split("python\n", 1)[1].split(f"\n{fence}", 1)[0]
        line = next(x for x in body.splitlines() if x.startswith("model = "))
        call = line.removeprefix("model = ").split("  #")[0]
        assert eval(call.split("(", 1)[1].rsplit(")", 1)[0].split(", pretrained")[0]) == expected  # noqa: S307


def test_a_record_cannot_close_its_code_block():
    plan = convert("resnet18", "eca-after-stages", dry_run=True, flops=False).plan
    hostile = "```\n</details>\n# Injected heading\n<img src=x onerror=alert(1)>"
    card = ModelCard(
        plan, "src", timm_loading("d"), init={"method": "default", "note": hostile}
    ).to_markdown()
    block = card.split("<details><summary>Init record</summary>\n\n", 1)[1].split("\n\n</details>", 1)[0]
    fence = block.split("json\n", 1)[0]
    assert len(fence) > 3 and block.endswith(fence) and block.count(fence) == 2


def test_a_half_precision_timm_card_says_timm_loads_float32():
    plan = convert("resnet18", "eca-after-stages", dry_run=True, flops=False).plan
    card = ModelCard(plan, "src", timm_loading("d"), dtype="float16").to_markdown()
    assert "into a float32 model" in card and "model.to(torch.float16)" in card
    assert "into a float32 model" not in ModelCard(plan, "src", timm_loading("d")).to_markdown()


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"opset": "18"}, "opset"),
        ({"opset": 18.5}, "opset"),
        ({"atol": "1e-3"}, "atol"),
        ({"seed": 2**70}, "seed"),
        ({"dtype": "float8"}, "dtype"),
        ({"input_size": (True, 64, 64)}, "input_size"),
        ({"input_size": "3x64x64"}, "input_size"),
    ],
)
def test_options_from_python_are_checked_before_any_work(options, flag, tmp_path, monkeypatch):
    # a string opset or atol raised TypeError; a huge seed ValueError after the model was built
    monkeypatch.setattr(export_module, "_open", lambda *a: pytest.fail("the checkpoint was opened"))
    with pytest.raises(SurgeryError, match=f"`{flag}`"):
        export_checkpoint(
            tmp_path / "none.safetensors", torch_export=tmp_path / "m.pt2", options=ExportOptions(**options)
        )
    assert list(tmp_path.iterdir()) == []


def test_a_features_only_model_is_tagged_as_feature_extraction():
    # its hub card called a feature extractor (lists of maps, no classifier) image-classification
    import timm

    from eca_surgery.card import task_of

    assert (
        task_of(timm.create_model("mobilenetv3_small_050", features_only=True)) == "image-feature-extraction"
    )
    assert task_of(timm.create_model("mobilenetv3_small_050", num_classes=0)) == "image-classification"


def test_outputs_of_another_shape_are_not_blamed_on_the_tolerance():
    # a detection model's ONNX file kept other boxes: "differs by up to inf ... pass a larger atol"
    rows = export_module.compare(
        _Images().eval(), lambda x: [torch.zeros(1, 3)], [torch.ones(1, 3, 8, 8)], 1e-4
    )
    result = export_module.FormatResult("onnx", "m.onnx", "dynamo", 18, 0.0, (), 1e-4, rows)
    with pytest.raises(ParityError, match="differ in number or shape") as caught:
        export_module._refuse_if_off(result)
    assert "larger `atol`" not in str(caught.value) and caught.value.result is result


def test_an_init_record_from_a_file_cannot_inject_markdown():
    # the init method and the fidelity keys were pasted into the card as they were
    plan = convert("resnet18", "eca-after-stages", dry_run=True, flops=False).plan
    init = {
        "method": "a`b\n# Injected",
        "fidelity": {"<img src=x onerror=alert(1)>\n# H": 0.5, "max_abs": 0.25},
    }
    card = ModelCard(plan, "src", timm_loading("d"), init=init).to_markdown()
    summary = next(line for line in card.splitlines() if line.startswith("Init: "))
    assert (
        summary
        == "Init: `a'b # Injected`. Fidelity to the original model: `<img src=x onerror=alert(1)> # H` 0.5, max_abs 0.25."
    )
    assert "\n# Injected" not in card and "\n# H" not in card


@pytest.mark.parametrize("size", [(3, 4097, 224), (65, 64, 64), (3, 16384, 16384)])
def test_an_input_size_beyond_memory_bounds_is_refused_before_any_work(size):
    from eca_surgery.export import ExportError, check_size

    with pytest.raises(ExportError, match="H and W at most 4096"):
        check_size(size)
