"""`eca-surgery heal`: distillation on CPU, what it trains, resumption, and its errors."""

import json
import shutil

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eca_surgery.checkpoint import save_patched
from eca_surgery.recipe import load_recipe
from eca_surgery.surgery import convert

SMALL = {"num_classes": 10, "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
FAST = ["--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher checkpoint, its fit-se conversion, and a folder of 12 images."""
    root = tmp_path_factory.mktemp("heal")
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_file(timm.create_model("seresnet18", **SMALL).state_dict(), teacher)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        folder = root / "images" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()).save(folder / f"{i}.png")
    conv = convert(
        "seresnet18", load_recipe("se-to-eca"), checkpoint=teacher, init="fit-se", calib_size=4, **SMALL
    )
    patched = save_patched(
        conv.model,
        root / "patched.safetensors",
        conv.plan,
        model_kwargs=SMALL,
        source=str(teacher),
        init=conv.init,
    )
    return root, patched, teacher


def heal_args(patched, root, out, *extra):
    return ["heal", str(patched), "--data", str(root / "images"), "-o", str(out), *FAST, *extra]


def test_heal_trains_only_the_eca_kernels_and_records_how(setup, tmp_path):
    root, patched, _ = setup
    out = tmp_path / "healed.safetensors"
    # no --teacher-checkpoint: the teacher's weights are the file PATCHED was converted from
    report = json.loads(run_ok(heal_args(patched, root, out, "--steps", "3", "--train", "eca", "--json")))
    assert report["steps"] == 3 and report["resumed_from_step"] == 0 and report["images_per_s"] > 0
    before, after = load_file(patched), load_file(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".se.conv.weight") for k in changed)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    heal = json.loads(meta["heal"])
    assert heal["step"] == 3 and heal["settings"]["train"] == "eca" and heal["teacher"] == "seresnet18"
    assert heal["teacher_weights"].endswith("teacher.safetensors") and heal["trainable"] == 8
    assert json.loads(meta["init"])["method"] == "fit-se"  # the conversion's record is kept


def test_heal_resumes_exactly_where_it_stopped(setup, tmp_path):
    root, patched, teacher = setup
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    common = ["--teacher-checkpoint", str(teacher), "--train", "norm"]
    run_ok(heal_args(patched, root, resumed, "--steps", "2", *common))
    out = run_ok(heal_args(patched, root, resumed, "--steps", "4", "--resume", *common))
    assert "Healed steps 3-4" in " ".join(out.split())
    run_ok(heal_args(patched, root, straight, "--steps", "4", *common))
    a, b = load_file(resumed), load_file(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must equal an uninterrupted one"
    msg = run_fail(heal_args(patched, root, resumed, "--steps", "4", "--resume", *common), tmp_path)
    assert "already been healed for 4 steps" in msg
    msg = run_fail(
        heal_args(patched, root, resumed, "--steps", "6", "--resume", *common[:2], "--train", "eca"), tmp_path
    )
    assert "healed with other settings (train norm -> eca)" in msg


@pytest.mark.parametrize("problem", ["missing", "empty", "no-images", "corrupt", "file"])
def test_heal_refuses_an_unusable_data_folder(setup, tmp_path, problem):
    root, patched, _ = setup
    data = tmp_path / "data"
    if problem != "missing":
        data.mkdir()
    if problem == "no-images":
        (data / "readme.txt").write_text("no images here")
    if problem == "corrupt":
        shutil.copytree(root / "images", data, dirs_exist_ok=True)
        (data / "c0" / "broken.png").write_bytes(b"\x89PNG but not really")
    if problem == "file":
        data = tmp_path / "one.png"
        shutil.copy(root / "images" / "c0" / "0.png", data)
    out = tmp_path / "out.safetensors"
    args = ["heal", str(patched), "--data", str(data), "-o", str(out), "--steps", "2", "--batch-size", "16"]
    msg = run_fail(args, tmp_path, out)
    expected = {
        "missing": "does not exist",
        "empty": "holds no images",
        "no-images": "holds no images",
        "corrupt": "broken.png' cannot be read",
        "file": "is not a folder",
    }[problem]
    assert expected in msg


def test_heal_user_errors(setup, tmp_path):
    root, patched, teacher = setup
    out = tmp_path / "out.safetensors"
    msg = run_fail(heal_args(patched, root, out, "--resume"), tmp_path, out)
    assert "not written by `eca-surgery heal`" in msg or "does not exist" in msg
    msg = run_fail(heal_args(patched, root, out, "--train", "bias"), tmp_path, out)
    assert "Unknown --train 'bias'" in msg
    msg = run_fail(heal_args(patched, root, out, "--steps", "0"), tmp_path, out)
    assert "--steps must be at least 1" in msg
    msg = run_fail(heal_args(patched, root, out, "--device", "banana"), tmp_path, out)
    assert "--device 'banana' is not a device" in msg
    msg = run_fail(heal_args(patched, root, out, "--device", "cuda:7"), tmp_path, out)
    assert "--device 'cuda:7'" in msg and "--device cpu" in msg
    out.write_bytes(b"keep me")
    msg = run_fail(heal_args(patched, root, out), tmp_path)
    assert "already exists" in msg and out.read_bytes() == b"keep me"
    out.unlink()
    # converted from timm's random init: there is no teacher to distil from unless one is given
    conv = convert("seresnet18", load_recipe("se-to-eca"), **SMALL)
    random = save_patched(
        conv.model, tmp_path / "random.safetensors", conv.plan, model_kwargs=SMALL, source=conv.source
    )
    msg = run_fail(heal_args(random, root, out), tmp_path, out)
    assert "--teacher-checkpoint FILE" in msg
    msg = run_fail(
        heal_args(random, root, out, "--teacher", "resnet18", "--teacher-checkpoint", str(teacher)),
        tmp_path,
        out,
    )
    assert "Teacher checkpoint" in msg
