"""`eca-surgery heal`: distillation on CPU, what it trains, resumption, and its errors."""

import json
import shutil

import pytest
import timm
import torch
from cli_helpers import run_fail, run_ok, run_usage_error
from heal_inputs import heal_inputs
from PIL import Image
from randomised import assert_same_tensors, has_buffers
from safetensors import safe_open
from safetensors.torch import load_file

from eca_surgery.checkpoint import save_patched
from eca_surgery.recipe import load_recipe
from eca_surgery.surgery import convert

SMALL = {"num_classes": 10, "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
FAST = ["--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher checkpoint, its fit-se conversion, and a folder of 12 images."""
    return heal_inputs(tmp_path_factory.mktemp("heal"), SMALL, 12, classes=3, init="fit-se", calib_size=4)


def heal_args(patched, root, out, *extra):
    return ["heal", str(patched), "--data", str(root / "images"), "-o", str(out), *FAST, *extra]


def test_heal_trains_only_the_eca_kernels_and_records_how(setup, tmp_path):
    root, patched, teacher = setup
    out = tmp_path / "healed.safetensors"
    # no --teacher-checkpoint: the teacher's weights are the file PATCHED was converted from
    report = json.loads(run_ok(heal_args(patched, root, out, "--steps", "3", "--train", "eca", "--json")))
    assert report["steps"] == 3 and report["resumed_from_step"] == 0 and report["images_per_s"] > 0
    before, after = load_file(patched), load_file(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".se.conv.weight") for k in changed)
    # every other tensor, BatchNorm statistics included, is still the teacher's, bit for bit,
    # except those fit-se folded a factor into (recorded in the conversion's init record)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    folded = {t for b in json.loads(meta["init"])["blocks"] if b["fold"] for t in b["fold"]["tensors"]}
    source = load_file(teacher)
    assert has_buffers(source) and folded
    assert_same_tensors({k: v for k, v in source.items() if ".se." not in k and k not in folded}, after)
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
    msg = run_usage_error(heal_args(patched, root, out, "--train", "bias"), tmp_path)
    assert "--train" in msg and "'bias' is not one of 'eca', 'norm', 'all'" in msg
    msg = run_usage_error(heal_args(patched, root, out, "--steps", "0"), tmp_path)
    assert "Invalid value for '--steps'" in msg and "greater than or equal to 1" in msg
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


def test_an_interrupt_stops_between_steps_and_resume_is_exact(setup, tmp_path):
    """Ctrl-C (SIGINT) mid-run saves a consistent state: weights, BatchNorm statistics and
    optimizer moments of the last finished step, so --resume equals an uninterrupted run."""
    import os
    import signal

    from eca_surgery.errors import SurgeryError
    from eca_surgery.healing import HealSettings, heal

    root, patched, teacher = setup
    settings = HealSettings(steps=4, batch_size=4, lr=0.01, train="norm")
    args = dict(teacher_checkpoint=teacher, settings=settings)

    def interrupt(step, total, loss, speed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted.safetensors"
    with pytest.raises(SurgeryError, match="Interrupted \\(SIGINT\\) after step 2 of 4; progress saved"):
        heal(patched, root / "images", out, on_step=interrupt, **args)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    heal(patched, root / "images", out, resume=True, **args)
    straight = tmp_path / "straight.safetensors"
    heal(patched, root / "images", straight, **args)
    a, b = load_file(out), load_file(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_norm_training_means_norm_layers_only():
    from eca_surgery.healing import select_trainable

    model = timm.create_model("regnety_002", device="meta")  # ConvNormAct blocks hold convs and norms
    names = select_trainable(model, [], "norm")
    assert names and all(".bn." in n or n.startswith("stem.bn") for n in names), names[:5]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 20848


def test_heal_refuses_single_image_batches_and_changed_data(setup, tmp_path):
    root, patched, teacher = setup
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(root / "images" / "c0" / "0.png", one / "0.png")
    out = tmp_path / "out.safetensors"
    common = ["--teacher-checkpoint", str(teacher), "--steps", "1"]
    msg = run_fail(["heal", str(patched), "--data", str(one), "-o", str(out), *common], tmp_path, out)
    assert "needs at least 2" in msg and "--train eca" in msg
    run_ok(heal_args(patched, root, out, *common))
    args = [
        "heal",
        str(patched),
        "--data",
        str(one),
        "-o",
        str(out),
        *FAST,
        "--teacher-checkpoint",
        str(teacher),
    ]
    msg = run_fail([*args, "--steps", "2", "--resume", "--train", "eca"], tmp_path)
    assert "healed with other settings" in msg and "data" in msg


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    import numpy as np

    from eca_surgery.data import to_rgb

    pixels = np.array([[0, 32768], [65535, 1024]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        rgb = np.asarray(to_rgb(img))
    assert rgb[..., 0].tolist() == [[0, 128], [255, 4]]
