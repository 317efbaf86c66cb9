"""Any nn.Module through the Python API: inspect and convert take a model object (never
changed: the conversion works on a copy), its checkpoint is marked ``module:CLASS`` and
reloads only into a fresh build passed as ``model=``, and nothing a checkpoint records is
ever imported."""

from __future__ import annotations

import builtins
import importlib
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from randomised import assert_same_tensors, randomise_
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import EcaModule as ECA
from torch import nn

import eca_surgery
from eca_surgery import CheckpointError, SurgeryError, convert, load_patched, open_patched, save_patched
from eca_surgery.detect import unregister_se


class TinySE(nn.Module):
    """An SE block of its own, derived from no known class."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.act = nn.ReLU()
        self.restore = nn.Conv2d(channels // 4, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.restore(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), TinySE(cout)
    )


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.block1 = conv_block(3, 16)
        self.block2 = conv_block(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


class OtherCNN(TinyCNN):
    pass


CLASS = f"{TinyCNN.__module__}.TinyCNN"
SE_PATHS = ("block1.3", "block2.3")
X = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def registered():
    eca_surgery.register_se(TinySE, channels="reduce", gate="gate")
    yield
    unregister_se(TinySE)


@pytest.fixture
def net(registered):
    return randomise_(TinyCNN().eval(), seed=3)


@pytest.fixture
def saved(net, tmp_path):
    result = convert(net, "se-to-eca", flops=False)
    return result, result.save(tmp_path / "tiny.safetensors")


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[type]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def outside_se(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(SE_PATHS)}


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_inspect_takes_a_module_object_and_leaves_it_alone(net):
    before, types = snapshot(net)
    inspection = eca_surgery.inspect(net, "se-to-eca")
    assert inspection.model_name == CLASS and [b.path for b in inspection.se_blocks] == list(SE_PATHS)
    assert inspection.plan.model == CLASS and len(inspection.plan.edits) == 2
    assert inspection.macs["input_size"] == [3, 224, 224] and inspection.macs["macs_after"] > 0
    assert [type(m) for m in net.modules()] == types
    assert_same_tensors(before, net.state_dict())


def test_user_cnn_converts_on_a_copy_and_keeps_every_tensor_outside_se(net):
    before, types = snapshot(net)
    result = convert(net, "se-to-eca")
    assert result.model is not net and result.plan.model == CLASS and result.model_kwargs == {}
    assert result.check["finite"] and result.check["output_shape"] == [1, 10]
    assert result.macs["macs_before"] > 0 and "macs_error" not in result.macs
    assert result.native is None and result.source == "the model object's own weights"
    assert [type(m) for m in net.modules()] == types  # the object is never changed
    assert_same_tensors(before, net.state_dict())
    assert all(isinstance(result.model.get_submodule(p), ECA) for p in SE_PATHS)
    assert_same_tensors(outside_se(before), result.model.state_dict())
    assert torch.isfinite(result.model(X)).all()


def test_module_file_reloads_into_a_fresh_build_bit_for_bit(saved):
    result, path = saved
    metadata = metadata_of(path)
    assert metadata["model"] == f"module:{CLASS}" and metadata["format_version"] == "2"
    fresh = TinyCNN()
    loaded = load_patched(path, model=fresh)
    assert loaded is fresh and not loaded.training
    assert_same_tensors(result.model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(X), result.model.eval()(X))
    with torch.device("meta"):
        on_meta = TinyCNN()
    patched = open_patched(path, model=on_meta)  # filled by assignment
    assert patched.model_name == f"module:{CLASS}" and patched.plan.model == CLASS
    assert_same_tensors(result.model.state_dict(), patched.model.state_dict())


def test_module_file_without_a_model_is_refused_with_the_hint(saved):
    _, path = saved
    with pytest.raises(CheckpointError) as error:
        load_patched(path)
    assert "load_patched(path, model=TinyCNN())" in str(error.value) and CLASS in str(error.value)
    with pytest.raises(CheckpointError) as error:
        eca_surgery.verify(path)
    assert "verify cannot build" in str(error.value) and "open_patched(path, model=...)" in str(error.value)


def test_module_file_refuses_a_model_of_another_class_or_patched_already(saved):
    _, path = saved
    with pytest.raises(CheckpointError) as error:
        load_patched(path, model=OtherCNN())
    assert CLASS in str(error.value) and f"{CLASS[: -len('TinyCNN')]}OtherCNN" in str(error.value)
    patched = load_patched(path, model=TinyCNN())
    with pytest.raises(CheckpointError, match="do not fit .* as passed in `model`"):
        load_patched(path, model=patched)


def test_object_refuses_kwargs_pretrained_and_timm_dir(net, tmp_path):
    with pytest.raises(SurgeryError, match="build a model by its timm name"):
        convert(net, "se-to-eca", num_classes=3)
    with pytest.raises(SurgeryError, match="build a model by its timm name"):
        eca_surgery.inspect(net, "se-to-eca", num_classes=3)
    with pytest.raises(SurgeryError, match="`pretrained`"):
        convert(net, "se-to-eca", pretrained=True)
    with pytest.raises(SurgeryError, match="`timm_dir`.*model object"):
        convert(net, "se-to-eca", timm_dir=tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(SurgeryError, match="`timm_dir`.*model object"):
        convert(net, "se-to-eca", flops=False).save_timm_dir(tmp_path / "t")
    with pytest.raises(TypeError, match="timm model name or a torch.nn.Module"):
        eca_surgery.inspect(42)


def test_fit_se_on_the_user_cnn_with_seeded_noise(net):
    result = convert(net, "se-to-eca", init="fit-se", calib_size=8, flops=False)
    assert result.init["method"] == "fit-se" and result.init["edits"] == list(SE_PATHS)
    assert "Gaussian-noise inputs of 3x224x224" in result.init["calibration"]
    assert len(result.init["blocks"]) == 2 and result.check["finite"]


def test_object_with_a_checkpoint_loads_it_strictly_into_the_copy(net, tmp_path):
    source = tmp_path / "source.safetensors"
    save_file(net.state_dict(), str(source))
    blank = TinyCNN()
    result = convert(blank, "se-to-eca", checkpoint=source, flops=False)
    assert_same_tensors(outside_se(net.state_dict()), result.model.state_dict())
    assert result.source == str(source)
    with pytest.raises(CheckpointError, match="does not fit"):
        convert(TinyCNN(classes=3), "se-to-eca", checkpoint=source)
    dry = convert(blank, "se-to-eca", checkpoint=source, dry_run=True)
    assert dry.plan.model == CLASS and dry.native is None


def test_save_patched_of_an_object_needs_the_original(net, tmp_path):
    result = convert(net, "se-to-eca", flops=False)
    with pytest.raises(CheckpointError, match="Nothing was written.*original=result.original"):
        save_patched(result.model, tmp_path / "a.safetensors", result.plan)
    path = save_patched(result.model, tmp_path / "b.safetensors", result.plan, original=TinyCNN())
    assert metadata_of(path)["model"] == f"module:{CLASS}"


def test_torchvision_model_object_round_trips(tmp_path):
    net = randomise_(torchvision.models.mobilenet_v3_small().eval(), seed=5)
    result = convert(net, "se-to-eca", flops=False)
    assert len(result.plan.edits) == 9 and result.plan.model == "torchvision.models.mobilenetv3.MobileNetV3"
    path = result.save(tmp_path / "mnv3.safetensors")
    loaded = load_patched(path, model=torchvision.models.mobilenet_v3_small())
    assert_same_tensors(result.model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(X), result.model.eval()(X))


def test_a_timm_file_loads_into_a_model_passed_in(tmp_path):
    result = convert("seresnet18", "se-to-eca", flops=False, num_classes=5)
    path = result.save(tmp_path / "se.safetensors")
    assert metadata_of(path)["model"] == "seresnet18"
    loaded = load_patched(path, model=timm.create_model("seresnet18", num_classes=5))
    assert_same_tensors(load_patched(path).state_dict(), loaded.state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_patched(path, model=timm.create_model("seresnet18"))  # 1000 classes


SENTINEL = "eca_sentinel_pkg"
HOSTILE_NAMES = (
    "module:os.system",
    f"module:{SENTINEL}.Net",
    "os:system",
    f"{SENTINEL}:Net",
    f"hf-hub:{SENTINEL}/net",
    f"module:{SENTINEL}.Net; import os",
    f"module:{SENTINEL}.Net()",
    f"module:__import__('{SENTINEL}')",
    SENTINEL,  # a timm-looking name: timm has no such model
)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_checkpoint_never_names_code_to_import(saved, tmp_path, monkeypatch, name):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() | {"model": name}
    hostile = tmp_path / "hostile.safetensors"
    save_file(tensors, str(hostile), metadata=metadata)
    imported = []
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def spy(target, *args, **kwargs):
        imported.append(target)
        return real_import(target, *args, **kwargs)

    def spy_module(target, *args, **kwargs):
        imported.append(target)
        return real_import_module(target, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    monkeypatch.setattr(importlib, "import_module", spy_module)
    assert SENTINEL not in sys.modules
    with pytest.raises(SurgeryError):
        load_patched(hostile)
    if ":" in name:  # a timm name loads into the caller's own model
        with pytest.raises(SurgeryError):
            load_patched(hostile, model=TinyCNN())
    with pytest.raises(SurgeryError):
        eca_surgery.verify(hostile)
    assert SENTINEL not in sys.modules and "os.system" not in sys.modules
    assert not [t for t in imported if SENTINEL in str(t) or str(t).startswith("os.system")]


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Any PyTorch model through the Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md (any PyTorch model)", "exec"), scope)
    assert "# torchvision.models.mobilenetv3.MobileNetV3 9" in block
    assert scope["result"].plan.model == "torchvision.models.mobilenetv3.MobileNetV3"
    assert_same_tensors(scope["result"].model.state_dict(), scope["model"].state_dict())
