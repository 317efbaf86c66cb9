"""The Python API as a notebook user runs it: convert, save, reload; convert writing its own
outputs; and what a conversion that cannot be saved says."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from randomised import assert_same_tensors, randomise_
from safetensors import safe_open
from safetensors.torch import save_file

from eca_surgery import load_patched, load_recipe
from eca_surgery.errors import SurgeryError
from eca_surgery.surgery import RANDOM_SOURCE, convert

KWARGS = {"num_classes": 10}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """seresnet18 (10 classes) weights with every parameter and buffer random."""
    path = tmp_path_factory.mktemp("api") / "src.safetensors"
    save_file(randomise_(timm.create_model("seresnet18", pretrained=False, **KWARGS)).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def conversion(source):
    return convert("seresnet18", load_recipe("se-to-eca"), checkpoint=source, **KWARGS)


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_saved_conversion_reloads_with_its_kwargs_and_source(tmp_path, conversion, source):
    path = conversion.save(tmp_path / "seresnet18-eca.safetensors")
    model = load_patched(path)
    assert_same_tensors(conversion.model.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert torch.equal(model(x), conversion.model(x))
    metadata = _metadata(path)
    assert metadata["source_weights"] == str(source)
    assert json.loads(metadata["model_kwargs"]) == KWARGS
    assert json.loads(metadata["init"]) == {"method": "default"}
    assert json.loads(metadata["timm_native"]) == conversion.native is not None


def test_save_needs_force_to_replace(tmp_path, conversion):
    path = conversion.save(tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(SurgeryError, match="already exists"):
        conversion.save(path)
    assert path.read_bytes() == before
    assert conversion.save(path, force=True) == path


def test_save_timm_dir_loads_in_plain_timm(tmp_path, conversion):
    folder = conversion.save_timm_dir(tmp_path / "timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    assert_same_tensors(conversion.model.state_dict(), model.state_dict())
    with torch.no_grad():  # timm's EcaModule computes the same function in another op order
        torch.testing.assert_close(model(x), conversion.model(x), rtol=1e-5, atol=1e-5)


def test_convert_writes_its_outputs_and_records_them(tmp_path, source):
    out, tdir = tmp_path / "m.safetensors", tmp_path / "timm"
    result = convert("seresnet18", "se-to-eca", checkpoint=source, output=out, timm_dir=tdir, **KWARGS)
    assert (result.output, result.timm_dir) == (out, tdir)
    assert out.is_file() and (tdir / "model.safetensors").is_file()
    assert _metadata(out)["source_weights"] == str(source)


def test_convert_checks_its_outputs_before_any_work(tmp_path, source, monkeypatch):
    from eca_surgery import surgery

    def no_work(*args, **kwargs):
        raise AssertionError("weights were read before the outputs were checked")

    monkeypatch.setattr(surgery, "read_state_dict", no_work)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(SurgeryError, match="already exists"):
        convert("seresnet18", "se-to-eca", checkpoint=source, output=out, **KWARGS)
    with pytest.raises(SurgeryError, match="checkpoint"):  # an input may not be overwritten
        convert("seresnet18", "se-to-eca", checkpoint=source, output=source, force=True, **KWARGS)
    with pytest.raises(SurgeryError, match="timm cannot build"):  # timm_dir: a native plan, first
        convert("resnet18", "eca-after-stages", checkpoint=source, timm_dir=tmp_path / "t")
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_what_cannot_be_saved_says_why(tmp_path):
    planned = convert("seresnet18", "se-to-eca", dry_run=True)
    with pytest.raises(SurgeryError, match="`dry_run=True`"):
        planned.save(tmp_path / "m.safetensors")
    stages = convert("resnet18", "eca-after-stages", check=False, flops=False)
    assert stages.source == RANDOM_SOURCE and stages.native is None
    with pytest.raises(SurgeryError, match="timm cannot build"):
        stages.save_timm_dir(tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_api_messages_name_python_parameters():
    with pytest.raises(SurgeryError, match=r"Unknown `init` 'fitted'"):
        convert("seresnet18", "se-to-eca", init="fitted", dry_run=True)
    with pytest.raises(SurgeryError, match=r"`calib_size` must be at least 1"):
        convert("seresnet18", "se-to-eca", init="fit-se", calib_size=0, dry_run=True)
    with pytest.raises(SurgeryError, match=r"`init='identity'` starts inserted"):
        convert("seresnet18", "se-to-eca", init="identity", dry_run=True)
