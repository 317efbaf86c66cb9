"""evaluate: a converted model measured against its original on labelled images.

The expected figures come from a plain PyTorch loop written here (PIL, timm's own eval
transform, argmax), not from eca_surgery's data code. Models have random weights and
randomised BatchNorm statistics; each image is filed under a class chosen from the original's
own prediction (right for some images, wrong for the rest), so top-1 lies strictly between 0
and 1 and a label mapping off by one shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from cli_helpers import run_fail, run_ok
from PIL import Image
from randomised import randomise_
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from eca_surgery import Evaluation, convert, evaluate, load_patched
from eca_surgery.errors import SurgeryError

ROOT = Path(__file__).parent.parent
TINY = {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
SYNSETS = ImageNetInfo().label_names()


def _noise(count: int, seed: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(40, 36), (36, 48), (33, 33)]
    return [
        Image.fromarray((torch.rand(*sizes[i % 3], 3, generator=gen) * 255).byte().numpy())
        for i in range(count)
    ]


def _original(name: str, weights: Path, **kwargs) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(weights))
    return model.eval()


def _logits(model: torch.nn.Module, files: list[Path]) -> torch.Tensor:
    """The plain loop: each image through timm's eval transform for ``model``, one at a time."""
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        return torch.cat([model(transform(Image.open(f).convert("RGB"))[None]) for f in files]).float()


def _models(root: Path, name: str, **kwargs) -> tuple[Path, Path]:
    """(teacher weights, patched checkpoint): ``name`` randomised, then converted with se-to-eca."""
    teacher = root / "teacher.safetensors"
    save_file(randomise_(timm.create_model(name, pretrained=False, **kwargs), seed=3).state_dict(), teacher)
    conv = convert(name, "se-to-eca", checkpoint=teacher, check=False, flops=False, **kwargs)
    return teacher, conv.save(root / "patched.safetensors")


def _filed(root: Path, original: torch.nn.Module, names: list[str], place, count: int = 7) -> list[tuple]:
    """Write ``count`` noise PNGs to ``root``, each in the folder ``place(i, predicted)`` picks from
    ``names`` (the folder names in class order); return (file, class index) in sorted path order."""
    staging = root.parent / f"{root.name}-staging"
    staging.mkdir()
    images = [staging / f"img{i}.png" for i in range(count)]
    for img, path in zip(_noise(count, 1), images, strict=True):
        img.save(path)
    predicted = _logits(original, images).argmax(1).tolist()
    filed = []
    for i, (path, pred) in enumerate(zip(images, predicted, strict=True)):
        label = place(i, pred)
        target = root / names[label] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        filed.append((target, label))
    return sorted(filed)


def _expected(original, patched, filed) -> dict[str, float]:
    files, labels = [f for f, _ in filed], torch.tensor([y for _, y in filed])
    lo, lp = _logits(original, files), _logits(patched, files)
    po, pp = F.softmax(lo, 1), F.softmax(lp, 1)
    return {
        "original_top1": (lo.argmax(1) == labels).double().mean().item(),
        "patched_top1": (lp.argmax(1) == labels).double().mean().item(),
        "agreement": (lo.argmax(1) == lp.argmax(1)).double().mean().item(),
        "cosine": F.cosine_similarity(lo, lp, dim=1).mean().item(),
        "kl": (po * (po.log() - pp.log())).sum(1).mean().item(),
    }


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A converted 1000-class test_efficientnet and a folder of ImageNet synset subfolders,
    where images 0, 2, 4, 6 are filed under the original's prediction and the rest under the next class."""
    root = tmp_path_factory.mktemp("imagenet")
    teacher, patched = _models(root, "test_efficientnet", **TINY)
    original = _original("test_efficientnet", teacher, **TINY)
    filed = _filed(root / "val", original, SYNSETS, lambda i, p: p if i % 2 == 0 else (p + 1) % 1000)
    return root, teacher, patched, original, filed


def _check(result: Evaluation, expected: dict[str, float], images: int) -> None:
    assert result.images == images
    assert result.original.top1 == pytest.approx(expected["original_top1"], abs=1e-12)
    assert result.patched.top1 == pytest.approx(expected["patched_top1"], abs=1e-12)
    assert result.agreement == pytest.approx(expected["agreement"], abs=1e-12)
    assert result.logit_cosine == pytest.approx(expected["cosine"], abs=1e-5)
    assert result.kl == pytest.approx(expected["kl"], rel=1e-3, abs=1e-6)


def test_a_converted_model_on_imagenet_synset_folders_matches_a_plain_loop(imagenet):
    root, teacher, patched, original, filed = imagenet
    expected = _expected(original, load_patched(patched), filed)
    assert 0 < expected["original_top1"] < 1 and expected["original_top1"] == 4 / 7
    seen: list[tuple[int, int]] = []
    result = evaluate(
        patched, root / "val", labels="imagenet", batch_size=3, on_batch=lambda d, t: seen.append((d, t))
    )
    _check(result, expected, 7)
    assert result.classes == 1000 and result.original.top5 >= result.original.top1 and not result.notes
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert result.original_weights == str(teacher)  # found as heal finds its teacher: the converted file
    assert 0 < result.logit_cosine < 1 and result.kl > 0  # the conversion changed something


def test_synset_ids_are_read_from_file_names_too(imagenet, tmp_path):
    root, teacher, patched, original, filed = imagenet
    flat = tmp_path / "flat"
    flat.mkdir()
    for path, label in filed:
        (flat / f"{SYNSETS[label]}_{path.name}").write_bytes(path.read_bytes())
    result = evaluate(patched, flat, labels="imagenet", batch_size=4)
    assert result.original.top1 == pytest.approx(4 / 7, abs=1e-12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted 3-class seresnet18 and a folder of class subfolders a, b, c (sorted order):
    images 0-3 filed under the original's prediction, the rest under the other two classes."""
    root = tmp_path_factory.mktemp("folder")
    kwargs = {"num_classes": 3, **TINY}
    teacher, patched = _models(root, "seresnet18", **kwargs)
    original = _original("seresnet18", teacher, **kwargs)
    filed = _filed(root / "data", original, ["a", "b", "c"], lambda i, p: p if i < 4 else (p + 1 + i % 2) % 3)
    return root, teacher, patched, original, filed


def test_a_class_folder_is_labelled_in_sorted_order_and_matches_a_plain_loop(folder):
    root, teacher, patched, original, filed = folder
    expected = _expected(original, load_patched(patched), filed)
    assert expected["original_top1"] == 4 / 7 and {label for _, label in filed} == {0, 1, 2}
    result = evaluate(patched, root / "data", batch_size=2, teacher_checkpoint=teacher)
    _check(result, expected, 7)
    assert result.original.top5 == 1.0  # 3 classes: top-5 holds every class


def test_the_cli_reports_json_and_an_unlabelled_folder_gets_a_note(folder, tmp_path):
    root, teacher, patched, original, filed = folder
    report = json.loads(run_ok(["evaluate", str(patched), "--data", str(root / "data"), "--json"]))
    assert report["images"] == 7 and report["labels"] == "folder" and report["classes"] == 3
    assert set(report["patched"]) == {"top1", "top5", "images_per_s"} and report["notes"] == []
    loose = tmp_path / "loose"
    loose.mkdir()
    for path, _ in filed:
        (loose / path.name).write_bytes(path.read_bytes())
    unlabelled = json.loads(
        run_ok(["evaluate", str(patched), "-d", str(loose), "--json", "--batch-size", "4"])
    )
    assert unlabelled["original"]["top1"] is None and unlabelled["patched"]["top5"] is None
    assert (
        unlabelled["agreement"] == report["agreement"]
        and "not in one subfolder per class" in unlabelled["notes"][0]
    )
    none = json.loads(
        run_ok(["evaluate", str(patched), "-d", str(root / "data"), "--labels", "none", "--json"])
    )
    assert none["original"]["top1"] is None and "--labels none" in none["notes"][0]
    table = run_ok(["evaluate", str(patched), "-d", str(root / "data")])
    assert "top-1 agreement" in table and "original" in table


def _fail(args: list[str], workdir: Path) -> str:
    return run_fail(["evaluate", *args], workdir)


def test_bad_input_is_a_one_paragraph_error(imagenet, folder, tmp_path):
    _, _, net, _, _ = imagenet
    root, teacher, patched, _, filed = folder
    assert "does not exist" in _fail([str(patched), "-d", str(tmp_path / "nowhere")], tmp_path)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _fail([str(patched), "-d", str(tmp_path / "empty")], tmp_path)
    odd = tmp_path / "odd" / "n99999999"
    odd.mkdir(parents=True)
    (odd / "x.png").write_bytes(filed[0][0].read_bytes())
    message = _fail([str(net), "-d", str(odd.parent), "--labels", "imagenet"], tmp_path)
    assert "'n99999999'" in message and "not one of ImageNet-1k's" in message and "--labels folder" in message
    message = _fail([str(net), "-d", str(root / "data"), "--labels", "imagenet"], tmp_path)
    assert "names no ImageNet synset id" in message
    synsets = tmp_path / "synsets" / SYNSETS[5]
    synsets.mkdir(parents=True)
    (synsets / "x.png").write_bytes(filed[0][0].read_bytes())
    message = _fail([str(patched), "-d", str(synsets.parent), "--labels", "imagenet"], tmp_path)
    assert "gives 3 class logits, but there are 1000 ImageNet-1k classes" in message
    message = _fail([str(net), "-d", str(root / "data")], tmp_path)
    assert "gives 1000 class logits, but there are 3 class subfolders" in message and "--labels" in message


def test_without_an_original_the_error_names_teacher_checkpoint(tmp_path):
    patched = convert("seresnet18", "se-to-eca", check=False, flops=False, num_classes=3, **TINY)
    path = patched.save(tmp_path / "random.safetensors")
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    _noise(1, 0)[0].save(images / "0.png")
    message = _fail([str(path), "-d", str(tmp_path / "images")], tmp_path)
    assert "--teacher-checkpoint" in message
    with pytest.raises(SurgeryError, match="`teacher_checkpoint="):
        evaluate(path, tmp_path / "images")


def test_library_options_are_checked_and_named(folder):
    root, _, patched, _, _ = folder
    with pytest.raises(SurgeryError, match="`labels`"):
        evaluate(patched, root / "data", labels="synsets")
    with pytest.raises(SurgeryError, match="`batch_size`"):
        evaluate(patched, root / "data", batch_size=0)
    with pytest.raises(SurgeryError, match="`workers`"):
        evaluate(patched, root / "data", workers=-1)


def test_torchrun_shards_the_images_and_reports_the_totals_once(folder):
    root, teacher, patched, original, filed = folder
    single = evaluate(patched, root / "data", batch_size=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [
        "-m",
        "eca_surgery",
        "evaluate",
        str(patched),
        "-d",
        str(root / "data"),
        "--batch-size",
        "2",
        "--json",
    ]
    done = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON object: process 1 printed nothing
    assert report["world"] == 2 and report["images"] == 7
    assert (
        report["original"]["top1"] == single.original.top1
        and report["patched"]["top1"] == single.patched.top1
    )
    assert report["agreement"] == single.agreement
    assert report["logit_cosine"] == pytest.approx(single.logit_cosine, abs=1e-6)
    assert report["kl"] == pytest.approx(single.kl, rel=1e-4, abs=1e-7)
