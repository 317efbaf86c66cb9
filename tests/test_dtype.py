"""Half-precision files: `--dtype float16|bfloat16` on convert and heal, the dtype the metadata
records, load_patched restoring it, verify checking it, and the refusals (an unknown dtype,
a file whose tensors contradict its record, a model that overflows in float16)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok
from heal_inputs import heal_inputs
from randomised import randomise_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eca_surgery import CheckpointError, SurgeryError, convert, load_patched


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A seresnet18 checkpoint with every weight and BatchNorm statistic randomised."""
    path = tmp_path_factory.mktemp("dtype") / "src.safetensors"
    save_file(randomise_(timm.create_model("seresnet18")).state_dict(), path)
    return path


def _floating_dtypes(tensors) -> set[torch.dtype]:
    return {t.dtype for t in tensors.values() if t.is_floating_point()}


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_a_half_precision_file_is_half_the_size_and_loads_in_that_dtype(source, tmp_path, dtype, rtol):
    full, half = tmp_path / "f32.safetensors", tmp_path / "half.safetensors"
    base = ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(source), "--json"]
    assert json.loads(run_ok([*base, "-o", str(full)]))["dtype"] == "float32"
    report = json.loads(run_ok([*base, "-o", str(half), "--dtype", dtype]))
    assert report["dtype"] == dtype and report["check"]["dtype"] == dtype  # checked again in that dtype
    assert f"stored in its dtype, {dtype}" in run_ok(
        [*base[:-1], "-o", str(tmp_path / "shown.safetensors"), "--dtype", dtype]
    )
    assert abs(half.stat().st_size / full.stat().st_size - 0.5) < 0.01
    with safe_open(str(half), framework="pt") as f:
        assert f.metadata()["dtype"] == dtype
    model = load_patched(half)
    assert _floating_dtypes(model.state_dict()) == {getattr(torch, dtype)}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = load_patched(full)(x), model(x.to(getattr(torch, dtype))).float()
    assert (got - expected).abs().max() <= rtol * expected.abs().max()
    verified = json.loads(run_ok(["verify", str(half), "--json"]))
    assert (verified["dtype"], verified["dtype_recorded"]) == (dtype, dtype)


def test_a_model_passed_in_gets_the_files_dtype(source, tmp_path):
    model = randomise_(timm.create_model("seresnet18"))
    path = convert(model, "se-to-eca", dtype="float16", output=tmp_path / "m.safetensors").output
    reloaded = load_patched(path, model=timm.create_model("seresnet18"))  # built in float32
    assert _floating_dtypes(reloaded.state_dict()) == {torch.float16}
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in load_file(path).items())


def test_an_unknown_dtype_is_refused_before_any_work(source, tmp_path):
    with pytest.raises(
        SurgeryError, match="Unknown `dtype` 'float8'; choose one of: float32, float16, bfloat16"
    ):
        convert("seresnet18", "se-to-eca", dtype="float8", output=tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_tensors_that_contradict_the_recorded_dtype_are_refused(source, tmp_path):
    path = convert("seresnet18", "se-to-eca", checkpoint=source, dtype="float16").save(
        tmp_path / "m.safetensors"
    )
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k).float() for k in f.keys()}
    save_file(tensors, tmp_path / "changed.safetensors", metadata)  # float32 tensors, float16 recorded
    message = run_fail(["verify", str(tmp_path / "changed.safetensors")], tmp_path)
    assert "records dtype float16, but" in message and "Convert the model again" in message
    save_file(tensors, tmp_path / "odd.safetensors", metadata | {"dtype": "float8_e4m3"})
    with pytest.raises(CheckpointError, match="its dtype is 'float8_e4m3'"):
        load_patched(tmp_path / "odd.safetensors")


def test_a_model_that_overflows_in_float16_is_not_written(tmp_path):
    model = randomise_(timm.create_model("seresnet18"))
    with torch.no_grad():
        model.fc.weight.mul_(1e5)  # logits far beyond float16's 65504
    out = tmp_path / "m.safetensors"
    with pytest.raises(SurgeryError, match="In float16 the converted model's output has NaN or infinite"):
        convert(model, "se-to-eca", dtype="float16", output=out)
    assert not out.exists()


def test_heal_trains_a_float16_file_in_float32_and_writes_the_dtype_asked(tmp_path):
    root, patched, teacher = heal_inputs(tmp_path, {}, images=4, dtype="float16")
    assert _floating_dtypes(load_file(patched)) == {torch.float16}
    args = ["heal", str(patched), "--data", str(root / "images"), "--steps", "2", "--batch-size", "2"]
    kept = json.loads(run_ok([*args, "-o", str(root / "h16.safetensors"), "--json"]))
    assert kept["steps"] == 2
    assert _floating_dtypes(load_file(root / "h16.safetensors")) == {torch.float16}
    run_ok([*args, "-o", str(root / "h32.safetensors"), "--dtype", "float32"])
    healed = load_file(root / "h32.safetensors")
    assert _floating_dtypes(healed) == {torch.float32}
    with safe_open(str(root / "h32.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["heal"])["settings"]["dtype"] == "float32"
    run_ok(["verify", str(root / "h32.safetensors")])


def test_export_in_float16_checks_parity_at_half_precision_tolerances(source, tmp_path):
    pytest.importorskip("onnxruntime")
    patched = convert("seresnet18", "se-to-eca", checkpoint=source).save(tmp_path / "m.safetensors")
    args = ["export", str(patched), "--input-size", "3x64x64", "--dtype", "float16", "--json"]
    report = json.loads(
        run_ok([*args, "--onnx", str(tmp_path / "m.onnx"), "--torch-export", str(tmp_path / "m.pt2")])
    )
    onnx_result, program = report["formats"]
    assert (onnx_result["atol"], program["atol"]) == (1e-2, 1e-3)
    assert all(r["ok"] and r["max_rel"] < 1e-2 for r in onnx_result["rows"] + program["rows"])
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    floats = (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )
    assert {i.data_type for i in graph.initializer if i.data_type in floats} == {onnx.TensorProto.FLOAT16}
    message = run_fail(
        ["export", str(patched), "--dtype", "bfloat16", "--onnx", str(tmp_path / "b.onnx")], tmp_path
    )
    assert "ONNX has no bfloat16 convolution" in message and "--torch-export" in message
