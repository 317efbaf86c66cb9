"""Source weights: safetensors and PyTorch files (safely), wrappers, --pretrained from the
Hugging Face cache, --non-strict, and a CLI that starts without torch."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok
from randomised import assert_same_tensors, has_buffers, randomise_
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """seresnet18 parameters and buffers (BatchNorm statistics too) no initialisation could produce."""
    state = {k: v.clone() for k, v in randomise_(timm.create_model("seresnet18")).state_dict().items()}
    assert has_buffers(state)
    return state


def convert_json(args):
    return json.loads(run_ok(["convert", "seresnet18", "-r", "se-to-eca", *args, "--json"]))


def assert_kept(state, out):
    """Every tensor of ``state`` outside the SE blocks, parameter or buffer, is in ``out`` bit for
    bit, and ``out`` holds nothing else but the new ECA kernels."""
    converted = load_file(out)
    kept = {k: v for k, v in state.items() if ".se." not in k}
    assert kept and any(k.endswith("running_var") for k in kept)
    assert_same_tensors(kept, converted)
    assert all(k.endswith(".se.conv.weight") for k in converted.keys() - kept.keys())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"state_dict": {k: torch.zeros_like(v) for k, v in s.items()}, "state_dict_ema": s},
    ],
    ids=["plain", "state_dict", "ddp-model", "ema"],
)
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_pytorch_checkpoints_and_wrappers(source, tmp_path, wrap, suffix):
    ckpt = tmp_path / f"src{suffix}"
    torch.save(wrap(source), ckpt)
    out = tmp_path / "out.safetensors"
    convert_json(["-c", str(ckpt), "-o", str(out)])
    assert_kept(source, out)


def test_safetensors_with_module_prefix(source, tmp_path):
    ckpt = tmp_path / "src.safetensors"
    save_file({f"module.{k}": v for k, v in source.items()}, ckpt)
    out = tmp_path / "out.safetensors"
    convert_json(["-c", str(ckpt), "-o", str(out)])
    assert_kept(source, out)


class Planted:
    """Unpickling this would create a file (if anything executed it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_and_never_executed(source, tmp_path):
    marker = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": source, "payload": Planted(str(marker))}, ckpt)
    assert not marker.exists()
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out)], tmp_path, out
    )
    assert "weights_only=True" in msg and "never executes" in msg
    assert not marker.exists()


def test_unreadable_pytorch_file(tmp_path):
    ckpt = tmp_path / "junk.pth"
    ckpt.write_bytes(b"not a torch file at all")
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out)], tmp_path, out
    )
    assert "not a readable PyTorch file" in msg


def test_non_strict_loads_what_fits_and_reports_the_rest(source, tmp_path):
    partial = {k: v for k, v in source.items() if not k.startswith("fc.")}
    partial["extra.weight"] = torch.zeros(3)
    ckpt = tmp_path / "partial.safetensors"
    save_file(partial, ckpt)
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out)], tmp_path, out
    )
    assert "2 missing: fc.weight, fc.bias" in msg and "1 unexpected: extra.weight" in msg
    report = convert_json(["-c", str(ckpt), "-o", str(out), "--non-strict"])
    assert report["non_strict"] == {"missing": ["fc.weight", "fc.bias"], "ignored": ["extra.weight"]}
    assert_same_tensors(
        {k: v for k, v in partial.items() if ".se." not in k and k != "extra.weight"}, load_file(out)
    )


def fake_hf_cache(root, repo, state):
    """The layout huggingface_hub's cache uses: refs/main names a snapshot folder."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")


def test_pretrained_from_the_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    state = randomise_(timm.create_model("seresnet50")).state_dict()
    hub_id = timm.create_model("seresnet50", pretrained=False).pretrained_cfg["hf_hub_id"]
    fake_hf_cache(tmp_path / "hub", hub_id, state)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out.safetensors"
    report = json.loads(
        run_ok(["convert", "seresnet50", "-r", "se-to-eca", "--pretrained", "-o", str(out), "--json"])
    )
    assert report["source_weights"] == f"timm pretrained {hub_id}/model.safetensors"
    assert_kept(state, out)


def test_pretrained_without_cache_or_network_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out.safetensors"
    msg = run_fail(
        ["convert", "seresnet50", "-r", "se-to-eca", "--pretrained", "-o", str(out)], tmp_path, out
    )
    assert "not in the Hugging Face cache" in msg and "--checkpoint FILE" in msg


@pytest.mark.parametrize(
    "args",
    [["--help"], ["recipes"], ["recipe", "check", "se-to-eca"], ["recipe", "schema"], ["convert", "--help"]],
)
def test_cli_starts_without_torch_or_timm(args):
    code = (
        "import sys\nfrom eca_surgery.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'safetensors') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_pretrained_file_names_the_python_parameter_that_takes_a_file(tmp_path, monkeypatch):
    """The library names its parameter (`checkpoint=FILE`); the CLI rewrites it to --checkpoint FILE."""
    import huggingface_hub.constants

    from eca_surgery.cli import FLAGS
    from eca_surgery.errors import CheckpointError, with_flags
    from eca_surgery.weights import pretrained_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="`checkpoint=FILE`") as error:
        pretrained_file("seresnet50")
    assert "--" not in str(error.value)
    assert with_flags(str(error.value), {"checkpoint": "--checkpoint"}).endswith("with --checkpoint FILE.")
    with pytest.raises(CheckpointError, match="`teacher_checkpoint=FILE`") as error:
        pretrained_file("seresnet50", "teacher_checkpoint")
    assert with_flags(str(error.value), FLAGS).endswith("with --teacher-checkpoint FILE.")
