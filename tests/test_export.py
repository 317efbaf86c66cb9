"""`export`: ONNX and torch.export files that compute what the patched model computes.

Every model here has random weights and random BatchNorm buffers (tests/randomised.py), so a
file that lost or reset a tensor gives different numbers. Small models and 64x64 inputs keep
the file fast; the benchmark (benchmarks/export_parity.py) covers the large ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok, run_usage_error
from randomised import randomise_
from safetensors.torch import save_file

import eca_surgery.export as export_module
from eca_surgery import ExportOptions, ParityError, convert, export_checkpoint, load_patched, parse_recipe
from eca_surgery.recipe import load_recipe

pytest.importorskip("onnxruntime")

KEEP_GATE = """
version: 1
name: se-to-eca-keep-gate
rules:
  - action: replace
    select: {se: true}
    eca: {gate: keep}
"""


def _patched(folder: Path, model: str, build, recipe) -> Path:
    """A checkpoint of ``model`` converted by ``recipe`` from random weights and BN buffers."""
    source, output = folder / f"{model.replace(':', '_')}-src.safetensors", folder / "patched.safetensors"
    save_file(randomise_(build()).state_dict(), str(source))
    convert(model, recipe, checkpoint=source, output=output, num_classes=10)
    return output


@pytest.fixture(scope="module")
def seresnet(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seresnet")
    build = lambda: timm.create_model("seresnet18", num_classes=10)  # noqa: E731
    return _patched(folder, "seresnet18", build, load_recipe("se-to-eca"))


@pytest.fixture(scope="module")
def both(seresnet, tmp_path_factory) -> tuple[dict, Path]:
    """The CLI's --json report of an ONNX and a torch.export export of the seresnet18 checkpoint."""
    folder = tmp_path_factory.mktemp("both")
    args = [
        "export",
        str(seresnet),
        "--onnx",
        str(folder / "m.onnx"),
        "--torch-export",
        str(folder / "m.pt2"),
    ]
    return json.loads(run_ok([*args, "--input-size", "3x64x64", "--json"])), folder


def _shapes(fmt: dict) -> list[tuple[int, ...]]:
    return [tuple(r["shape"]) for r in fmt["rows"]]


def test_onnx_agrees_at_batch_1_and_2_and_two_sizes(both):
    report, folder = both
    onnx = report["formats"][0]
    assert onnx["format"] == "onnx" and onnx["exporter"] == "dynamo" and onnx["ok"]
    assert _shapes(onnx) == [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 96, 128), (2, 3, 96, 128)]
    assert all(r["ok"] and r["max_abs"] <= 1e-4 for r in onnx["rows"])
    assert any(r["max_abs"] > 0 for r in onnx["rows"])  # ONNX Runtime really ran its own kernels
    assert [d["name"] for d in onnx["dynamic"]] == ["batch", "height", "width"]
    assert all(d["max"] is None for d in onnx["dynamic"])
    assert (folder / "m.onnx").stat().st_size > 1e6
    assert not [p for p in folder.iterdir() if "eca-surgery-tmp" in p.name]


def test_torch_export_round_trip(both, seresnet):
    report, folder = both
    program = report["formats"][1]
    assert program["format"] == "torch.export" and program["ok"] and program["atol"] == 1e-5
    assert _shapes(program) == _shapes(report["formats"][0])
    loaded = torch.export.load(str(folder / "m.pt2")).module()
    model = load_patched(seresnet)
    x = torch.randn(2, 3, 80, 72, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-5


def test_json_keys(both):
    report, _ = both
    assert set(report) == {"checkpoint", "model", "input_size", "static", "formats", "hub_dir", "ok"}
    assert report["model"] == "seresnet18" and report["input_size"] == [3, 64, 64] and report["ok"]
    keys = {"format", "path", "exporter", "opset", "seconds", "dynamic", "atol", "rows", "notes", "ok"}
    assert all(set(f) == keys for f in report["formats"])
    assert set(report["formats"][0]["rows"][0]) == {"shape", "max_abs", "max_rel", "ok"}


def test_hard_sigmoid_eca_of_mobilenetv3_exports(tmp_path):
    build = lambda: timm.create_model("mobilenetv3_small_050", num_classes=10)  # noqa: E731
    patched = _patched(tmp_path, "mobilenetv3_small_050", build, parse_recipe(KEEP_GATE))
    options = ExportOptions(input_size=(3, 64, 64))
    result = export_checkpoint(
        patched, onnx=tmp_path / "m.onnx", torch_export=tmp_path / "m.pt2", options=options
    )
    assert [f.ok for f in result.formats] == [True, True] and len(result.formats[0].rows) == 4


def test_torchvision_model_exports_static(tmp_path):
    import torchvision

    build = lambda: torchvision.models.mobilenet_v3_small(num_classes=10)  # noqa: E731
    patched = _patched(tmp_path, "torchvision:mobilenet_v3_small", build, load_recipe("se-to-eca"))
    options = ExportOptions(static=True, input_size=(3, 64, 64))
    result = export_checkpoint(patched, onnx=tmp_path / "m.onnx", options=options)
    onnx = result.formats[0]
    assert onnx.ok and onnx.dynamic == () and [r.shape for r in onnx.rows] == [(1, 3, 64, 64)] * 2


def test_a_perturbed_weight_is_caught_and_not_kept(seresnet, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    produce = export_module.produce_onnx

    def perturbed(*args, **kwargs):
        exporter = produce(*args, **kwargs)
        tmp = args[-1]
        graph = onnx.load(str(tmp))
        init = next(i for i in graph.graph.initializer if numpy_helper.to_array(i).size > 100)
        array = numpy_helper.to_array(init).copy()
        array.flat[0] += 0.5
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        onnx.save(graph, str(tmp))
        return exporter

    monkeypatch.setattr(export_module, "produce_onnx", perturbed)
    output = tmp_path / "m.onnx"
    with pytest.raises(ParityError, match="above the tolerance") as caught:
        export_checkpoint(seresnet, onnx=output, options=ExportOptions(input_size=(3, 64, 64)))
    assert not caught.value.result.ok and max(r.max_abs for r in caught.value.result.rows) > 1e-4
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_missing_extra_names_the_pip_command(seresnet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now fails
    message = run_fail(["export", str(seresnet), "--onnx", str(tmp_path / "m.onnx")], tmp_path)
    assert "pip install 'eca-surgery[onnx]'" in message


def test_an_existing_output_needs_force(seresnet, tmp_path):
    output = tmp_path / "m.pt2"
    output.write_bytes(b"keep me")
    message = run_fail(["export", str(seresnet), "--torch-export", str(output)], tmp_path)
    assert "already exists" in message and "--force" in message and "choose another --torch-export" in message
    assert output.read_bytes() == b"keep me"


def test_an_input_too_small_for_the_model(seresnet, tmp_path):
    args = ["export", str(seresnet), "--torch-export", str(tmp_path / "m.pt2"), "--input-size", "3x8x8"]
    message = run_fail(args, tmp_path, tmp_path / "m.pt2")
    assert "too small" in message and "--input-size" in message and "--static" in message


def test_a_file_not_written_by_eca_surgery(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    message = run_fail(["export", str(foreign), "--onnx", str(tmp_path / "m.onnx")], tmp_path)
    assert "not written by eca-surgery" in message


def test_an_output_is_required_and_options_are_checked(seresnet, tmp_path):
    assert "--onnx" in run_usage_error(["export", str(seresnet)], tmp_path)
    args = ["export", str(seresnet), "--onnx", str(tmp_path / "m.onnx")]
    assert "three positive integers" in run_fail([*args, "--input-size", "3x64"], tmp_path)
    assert "CxHxW" in run_fail([*args, "--input-size", "3xAx64"], tmp_path)
    assert "--atol" in run_fail([*args, "--atol", "0"], tmp_path)


def test_convert_imports_no_onnx_package(tmp_path):
    code = (
        "import sys, eca_surgery\n"
        "eca_surgery.convert('resnet18', 'eca-after-stages', output=sys.argv[1])\n"
        "assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), 'an ONNX package was imported'\n"
    )
    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.safetensors")], check=True, cwd=root)
