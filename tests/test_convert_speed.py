"""issue 14: convert at the speed floor. The default path runs each model once on the meta
device (shape and MACs together) and the patched model once for real; the timm-native search
builds each candidate once per process; a dry run reads only a safetensors file's header."""

from __future__ import annotations

import json
import mmap
import threading
from pathlib import Path

import pytest
import safetensors
import timm
import torch
from safetensors.torch import save_file
from spies import counting

import eca_surgery.checkpoint as checkpoint
import eca_surgery.checks as checks
import eca_surgery.flops as flops
import eca_surgery.native as native
import eca_surgery.surgery as surgery
from eca_surgery import convert, find_native, load_patched, make_plan
from eca_surgery.errors import CheckpointError, SurgeryError
from eca_surgery.models import _block_params_off_meta, create_model
from eca_surgery.recipe import load_recipe
from eca_surgery.weights import read_safetensors, read_safetensors_header, read_state_dict

MiB = 2**20


def _sparse_safetensors(path: Path, model: torch.nn.Module) -> int:
    """A valid safetensors file of ``model``'s state_dict whose data is a hole (all zeros, no
    disk used): written by hand, header then a truncate to the full size. Its size in bytes."""
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        size = t.numel() * t.element_size()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return 8 + len(text) + offset


def _rchar() -> int:
    """Bytes this process has read through read() and the like so far (Linux)."""
    text = Path("/proc/self/io").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_dry_run_reads_only_the_header_of_a_large_checkpoint(tmp_path, monkeypatch):
    big = tmp_path / "seresnext101_32x8d.safetensors"
    size = _sparse_safetensors(big, create_model("seresnext101_32x8d", meta=True))
    assert size > 300 * MiB
    convert("seresnext101_32x8d", "se-to-eca", dry_run=True)  # imports and caches warm
    refuse = pytest.fail  # no mapping of the file, no safetensors reader: the header only
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: refuse("safe_open"))
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: refuse("mmap"))
    before = _rchar()
    result = convert("seresnext101_32x8d", "se-to-eca", checkpoint=big, dry_run=True)
    read = _rchar() - before
    assert result.dry_run and result.plan.edits and result.macs["macs_after"]
    assert read < MiB, f"a dry run read {read} bytes of a {size}-byte checkpoint"


def test_header_agrees_with_safetensors(tmp_path):
    model = timm.create_model("seresnet18")
    path = tmp_path / "w.safetensors"
    save_file({**model.state_dict(), "half": torch.zeros(3, 2, dtype=torch.float16)}, str(path))
    header, full = read_safetensors_header(path), read_safetensors(path)[0]
    assert list(header) == list(full)
    assert all(h.is_meta and h.shape == full[k].shape and h.dtype == full[k].dtype for k, h in header.items())


@pytest.mark.parametrize(
    "damage",
    [
        lambda h: h["a"].update(data_offsets=[0, 8]),  # shorter than its shape
        lambda h: h["b"].update(data_offsets=[0, 24]),  # overlaps a
        lambda h: h["a"].update(dtype="F99"),
        lambda h: h["a"].update(shape=[-1, 6]),
        lambda h: h.update(a=[1, 2]),
    ],
)
def test_damaged_header_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(6)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    damage(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_state_dict(path, shapes_only=True)


def test_dry_run_refuses_a_checkpoint_of_another_model_from_its_header(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(CheckpointError, match="does not fit seresnet18"):
        convert("seresnet18", "se-to-eca", checkpoint=path, dry_run=True)


def test_default_convert_runs_each_model_once(tmp_path, monkeypatch):
    path = tmp_path / "src.safetensors"
    save_file(timm.create_model("seresnet18").state_dict(), str(path))
    runs = counting(monkeypatch, checks, "run")
    separate = counting(monkeypatch, flops, "count_macs_or_reason")
    finite = counting(monkeypatch, surgery, "forward_check")
    builds = counting(monkeypatch, surgery, "create_model")
    result = convert("seresnet18", "se-to-eca", checkpoint=path)
    result.save(tmp_path / "out.safetensors")
    # the original on the meta device (the patched model's shape and MACs are derived from it),
    # then the patched model for real; one build, which save does not repeat to check the file
    assert [x.is_meta for _, x in runs] == [True, False]
    assert not separate and len(finite) == 1 and len(builds) == 1
    assert result.macs["macs_before"] > result.macs["macs_after"] > 0
    assert result.check["output_shape_at_default_size"] == [1, 1000] and result.check["finite"]
    assert result.native == {"model": "seresnet18", "kwargs": {"block_args": {"attn_layer": "eca"}}}


def test_native_search_builds_each_candidate_once_per_process(monkeypatch):
    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setattr(native, "_FAMILY", {})
    builds = counting(monkeypatch, native, "create_model")
    plan = make_plan(create_model("efficientnet_b0", meta=True), load_recipe("se-to-eca"), "efficientnet_b0")
    patched = surgery.apply_plan(create_model("efficientnet_b0", meta=True), plan)
    first = find_native("efficientnet_b0", {}, patched, plan)
    assert first == {"model": "efficientnet_b0", "kwargs": {"se_layer": "eca"}} and len(builds) == 1
    assert find_native("efficientnet_b0", {}, patched, plan) == first and len(builds) == 1


@pytest.mark.parametrize(
    "name", ["seresnet18", "efficientnet_b0", "vit_tiny_patch16_224", "torchvision:regnet_y_400mf"]
)
def test_meta_build_skipping_init_keeps_every_tensor(name):
    fast = create_model(name, meta=True)
    if name.startswith("torchvision:"):
        import torchvision

        with torch.device("meta"), _block_params_off_meta():
            plain = torchvision.models.get_model(name.split(":")[1], weights=None)
    else:
        with torch.device("meta"):
            plain = timm.create_model(name)
    got, want = fast.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    assert all(t.is_meta for t in got.values())


def test_loaded_checkpoint_is_the_converted_model(tmp_path):
    path = tmp_path / "src.safetensors"
    state = timm.create_model("seresnet18").state_dict()
    save_file(state, str(path))
    out = convert("seresnet18", "se-to-eca", checkpoint=path, output=tmp_path / "eca.safetensors")
    loaded = load_patched(out.output).state_dict()
    assert loaded.keys() == out.model.state_dict().keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state if k in loaded)


def test_save_rebuilds_a_model_changed_since_convert(tmp_path):
    result = convert("seresnet18", "se-to-eca")
    result.model.layer1[0].extra = torch.nn.Conv2d(1, 1, 1)  # shapes no longer those convert built
    with pytest.raises(CheckpointError, match="Nothing was written"):
        result.save(tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_meta_pass_that_leaves_a_cache_behind_gets_a_fresh_build(tmp_path, monkeypatch):
    forward_head = timm.models.resnet.ResNet.forward_head

    def caching(self, x, pre_logits=False):
        if getattr(self, "scale", None) is None:  # a cache made on the first pass's device
            self.scale = torch.ones((), device=x.device)
        return forward_head(self, x * self.scale, pre_logits)

    monkeypatch.setattr(timm.models.resnet.ResNet, "forward_head", caching)
    path = tmp_path / "src.safetensors"
    save_file(timm.create_model("seresnet18").state_dict(), str(path))
    builds = counting(monkeypatch, surgery, "create_model")
    result = convert("seresnet18", "se-to-eca", checkpoint=path)
    assert len(builds) == 2 and not result.model.scale.is_meta and result.check["finite"]


def test_the_finite_check_runs_while_the_checkpoint_is_written_and_a_failure_writes_nothing(
    tmp_path, monkeypatch
):
    writing = []

    def failing(model, x, stop=None):
        writing.append(threading.current_thread().name == "eca-surgery-meanwhile")
        raise SurgeryError("The patched model's output has NaN or infinite values; planted.")

    monkeypatch.setattr(surgery, "forward_check", failing)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SurgeryError, match="planted"):
        convert("seresnet18", "se-to-eca", output=out)
    assert writing == [True] and list(tmp_path.iterdir()) == []
    out.write_bytes(b"theirs")
    with pytest.raises(SurgeryError, match="planted"):
        convert("seresnet18", "se-to-eca", output=out, force=True)
    assert out.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [out]


def test_a_check_that_changes_a_weight_in_place_gets_the_file_written_again(tmp_path, monkeypatch):
    real, save = surgery.forward_check, checkpoint.save_safetensors
    written = threading.Event()

    def saving(*args):
        save(*args)
        written.set()

    def changing(model, x, stop=None):
        assert written.wait(timeout=60)  # the file is written: a change now is not in it
        with torch.no_grad():
            model.fc.bias.add_(1.0)  # as a forward pass that updates a buffer in eval mode would
        return real(model, x, stop)

    monkeypatch.setattr(checkpoint, "save_safetensors", saving)
    monkeypatch.setattr(surgery, "forward_check", changing)
    out = tmp_path / "out.safetensors"
    result = convert("seresnet18", "se-to-eca", output=out)
    assert torch.equal(load_patched(out).fc.bias, result.model.fc.bias)
