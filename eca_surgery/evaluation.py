"""Measure what a conversion costs: a patched classifier and its original on the same images.

Both models see the same batches in one pass, each in eval mode without gradients, the images
transformed by the patched model's own eval transform (``data.data_config``). The figures:

- top-1 and top-5 accuracy of each model, where the images have labels: one subfolder per
  class, indexed in sorted order as torchvision's ``ImageFolder`` does (``labels='folder'``), or
  ImageNet synset ids in folder or file names mapped to timm's 1000 class indices
  (``labels='imagenet'``);
- top-1 agreement (the share of images where both models pick the same class), the mean
  cosine similarity of their logits, and the mean KL(original || patched) of their softmaxes;
- images per second of each model's forward passes.

The original is found as ``heal`` finds its teacher (``healing.original_model``). Under
``torchrun`` each process evaluates every ``world``-th image and the sums are added up, so every
process returns the totals over the whole folder.
"""

from __future__ import annotations

import numbers
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Patched, open_patched
from .choices import Labels, choice
from .data import ImageFiles, checked, data_config, folder_loader, image_files, is_torchvision
from .errors import SurgeryError
from .healing import _distributed, check_loop_options, original_model, pick_device
from .models import dense_task, float_dtype, input_size

__all__ = ["Evaluation", "Labelled", "Scores", "evaluate", "labelled_files"]

OnBatch = Callable[[int, int], None]  # (images done, images in all)

IMAGENET_CLASSES = 1000
_SYNSET = re.compile(r"n\d{8}(?!\d)", re.IGNORECASE)  # N01440764 (a copy from an upper-case disk) too
# The sums one pass adds up (over processes too), in this order.
_SUMS = (
    "images", "patched_top1", "patched_top5", "original_top1", "original_top5", "agree", "cosine", "kl",
    "patched_nonfinite", "original_nonfinite",
)  # fmt: skip


@dataclass(frozen=True)
class Scores:
    """How one model did: top-1 and top-5 accuracy as fractions (None without labels) and the
    images per second of its forward passes (all processes together under torchrun)."""

    top1: float | None
    top5: float | None
    images_per_s: float


@dataclass(frozen=True)
class Evaluation:
    """A patched model measured against its original on the same images."""

    patched_path: str
    model_name: str
    data: str
    labels: Labels
    images: int
    classes: int  # the models' output classes
    patched: Scores
    original: Scores
    original_weights: str  # where the original's weights came from
    agreement: float  # the share of images both models give the same top-1 class
    logit_cosine: float  # mean over images of the cosine similarity of the two logit vectors
    kl: float  # mean over images of KL(original || patched) of the softmaxes, in nats
    device: str
    notes: tuple[str, ...] = ()
    rank: int = 0  # this process under torchrun (every process holds the same totals)
    world: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The evaluation as plain JSON values."""
        return asdict(self) | {"labels": self.labels.value, "notes": list(self.notes)}


@dataclass(frozen=True)
class Labelled:
    """The images of a folder and their class indices (None: unlabelled, with a note saying why)."""

    files: list[Path]
    targets: list[int] | None
    classes: int | None  # the classes the labels index: the folder's subfolders, or ImageNet's 1000
    note: str | None = None


def labelled_files(data: str | Path, labels: Labels | str = Labels.FOLDER) -> Labelled:
    """The images under ``data`` with their classes as ``labels`` says (see the module docstring)."""
    labels = choice(Labels, labels, "labels")
    files = image_files(data)
    if labels == Labels.NONE:
        return Labelled(files, None, None, "No top-1/top-5: `labels='none'` was asked for.")
    if labels == Labels.IMAGENET:
        return imagenet_labels(Path(data), files)
    return folder_labels(Path(data), files)


def folder_labels(root: Path, files: list[Path]) -> Labelled:
    """Classes as torchvision's ImageFolder finds them: the sorted subfolders of ``root``, each
    holding its images at any depth. Images directly in ``root`` alone make an unlabelled set."""
    loose = [f for f in files if f.parent == root]
    if len(loose) == len(files):
        return Labelled(
            files,
            None,
            None,
            f"No top-1/top-5: the images lie directly in {str(root)!r}, not in one subfolder per class.",
        )
    if loose:
        raise SurgeryError(
            f"{str(root)!r} holds images both directly inside it (e.g. {loose[0].name!r}) and in class "
            "subfolders; move each into its class's subfolder, or pass `labels='none'`."
        )
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    tops = [f.relative_to(root).parts[0] for f in files]
    empty = sorted(set(classes) - set(tops))
    if empty:
        raise SurgeryError(
            f"Class folder {str(root / empty[0])!r} holds no images, so its class index would have no "
            "image to measure; add images to it or remove it."
        )
    index = {name: i for i, name in enumerate(classes)}
    return Labelled(files, [index[top] for top in tops], len(classes))


def imagenet_labels(root: Path, files: list[Path]) -> Labelled:
    """Each image's class from the ImageNet synset id (``n01440764``) that its nearest folder
    name, else its file name, starts with, as timm's ImageNet-1k class index (read offline
    from timm's own table)."""
    from timm.data import ImageNetInfo

    index = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    targets = []
    for f in files:
        synset = _synset(f.relative_to(root))
        if synset is None:
            raise SurgeryError(
                f"Image {str(f)!r} names no ImageNet synset id (such as n01440764) in its folder or file "
                "name, which `labels='imagenet'` reads; rename it, or pass `labels='none'`."
            )
        if synset not in index:
            raise SurgeryError(
                f"{synset!r} (of image {str(f)!r}) is not one of ImageNet-1k's {IMAGENET_CLASSES} synset "
                "ids; use ImageNet-1k's class folders, or `labels='folder'` for classes of your own."
            )
        targets.append(index[synset])
    return Labelled(files, targets, IMAGENET_CLASSES)


def _synset(relative: Path) -> str | None:
    """The synset id that the nearest folder of ``relative``, else its file name, starts with."""
    for name in (*reversed(relative.parent.parts), relative.name):
        found = _SYNSET.match(name)
        if found:
            return found[0].lower()
    return None


def check_classifier(patched: Patched, path: str | Path) -> None:
    """Refuse a model whose output is not one logit per class of an RGB image."""
    model, shown = patched.model, str(path)
    task = dense_task(model)
    if task is not None:
        raise SurgeryError(
            f"evaluate measures classifiers, but {shown!r} is a torchvision {task} model; measure it with "
            f"your own {task} metrics on its outputs."
        )
    head = is_torchvision(model) or hasattr(model, "forward_head")
    if not head or getattr(model, "num_classes", None) == 0:
        raise SurgeryError(
            f"evaluate measures a classifier's logits, but {shown!r} is not a classifier (features_only, "
            "or built with num_classes=0); evaluate the classifier checkpoint it was made from."
        )
    if input_size(model)[0] != 3:
        raise SurgeryError(
            f"evaluate reads its images as RGB, but {shown!r} takes {input_size(model)[0]} channel(s); "
            "measure it in your own loop on inputs of that shape."
        )


def _check_options(batch_size: int, workers: int) -> None:
    """Refuse a ``batch_size`` below 1 and ``workers`` outside 0..MAX_WORKERS."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise SurgeryError(f"`batch_size` must be an integer of at least 1, got {str(batch_size)[:40]!r}.")
    check_loop_options(0, workers)


def _check_logits(
    patched: torch.Tensor, original: torch.Tensor, found: Labelled, labels: Labels, path: str
) -> None:
    """Refuse outputs that are not logits of the same classes, or of another count than the labels'."""
    if patched.dim() != 2 or patched.shape != original.shape:
        raise SurgeryError(
            f"evaluate compares logits, but the patched model gives {tuple(patched.shape)} and the original "
            f"{tuple(original.shape)}; pass the original {path!r} was converted from with `teacher` and "
            "`teacher_checkpoint`."
        )
    width = patched.shape[1]
    if found.classes is not None and width != found.classes:
        what, fix = (
            (
                "ImageNet-1k classes (`labels='imagenet'`)",
                "evaluate an ImageNet-1k classifier, or use `labels='folder'` for classes of your own",
            )
            if labels == Labels.IMAGENET
            else (
                "class subfolders in the data folder",
                "pass one subfolder per class of the model, or `labels='imagenet'` for folders named "
                "by ImageNet synset ids",
            )
        )
        raise SurgeryError(
            f"{path!r} gives {width} class logits, but there are {found.classes} {what}; {fix}, or "
            "`labels='none'` to compare the models only."
        )


def _timed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``model(x)`` as float32 logits, and the seconds it took (the device synchronised)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    tick = time.perf_counter()
    out = model(x.to(float_dtype(model)))
    sync()
    return out.float(), time.perf_counter() - tick


def _batch_sums(patched: torch.Tensor, original: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """This batch's contribution to each of :data:`_SUMS`. An image whose logits are not all
    finite counts as a miss and a disagreement (argmax would pick a NaN's class), and is counted."""
    log_p, log_o = F.log_softmax(patched, 1), F.log_softmax(original, 1)
    kl = (log_o.exp() * (log_o - log_p)).sum(1)
    cosine = F.cosine_similarity(patched, original, dim=1)
    finite_p, finite_o = torch.isfinite(patched).all(1), torch.isfinite(original).all(1)
    agree = (patched.argmax(1) == original.argmax(1)) & finite_p & finite_o
    hits = [torch.zeros((), device=patched.device)] * 4
    if targets is not None:
        k = min(5, patched.shape[1])
        hits = [
            part
            for logits, finite in ((patched, finite_p), (original, finite_o))
            for part in (
                ((logits.argmax(1) == targets) & finite).sum(),
                ((logits.topk(k, 1).indices == targets[:, None]).any(1) & finite).sum(),
            )
        ]
    parts = [
        torch.tensor(float(len(patched)), device=patched.device),
        *hits,
        agree.sum(),
        cosine.sum(),
        kl.sum(),
        (~finite_p).sum(),
        (~finite_o).sum(),
    ]
    return torch.stack([p.double() for p in parts])


def _batches(
    found: Labelled, config: dict[str, Any], batch_size: int, rank: int, world: int, workers: int, pin: bool
):
    """This process's share of the images (every ``world``-th, from ``rank``: no image twice,
    none left out) in batches, each with its class indices (None without labels)."""
    shard = list(range(rank, len(found.files), world))
    order = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    loader = folder_loader(ImageFiles(found.files, config), order, workers, pin)
    for indices, batch in zip(order, loader, strict=True):
        targets = None if found.targets is None else torch.tensor([found.targets[i] for i in indices])
        yield checked(batch), targets


@torch.inference_mode()
def _measure(
    models: tuple[nn.Module, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    check: Callable[[torch.Tensor, torch.Tensor], None],
    device: torch.device,
    progress: Callable[[int], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of both models over ``batches``: the sums of :data:`_SUMS` and each model's
    seconds of forward passes. ``check`` sees the first batch's logits."""
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    seconds = torch.zeros(2, dtype=torch.float64, device=device)
    for images, targets in batches:
        x = images.to(device, non_blocking=True)
        (patched, t_patched), (original, t_original) = (_timed(m, x) for m in models)
        if not sums[0]:
            check(patched, original)
        seconds += torch.tensor([t_patched, t_original], dtype=torch.float64, device=device)
        sums += _batch_sums(patched, original, None if targets is None else targets.to(device))
        progress(int(sums[0]))
    return sums, seconds


def _all_processes(sums: torch.Tensor, seconds: torch.Tensor, world: int) -> tuple[list[float], list[float]]:
    """The sums over every process (added) and the seconds of the slowest one."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return sums.tolist(), seconds.tolist()


def evaluate(
    patched: str | Path,
    data: str | Path,
    *,
    labels: Labels | str = Labels.FOLDER,
    teacher: str | None = None,
    teacher_checkpoint: str | Path | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str | None = None,
    on_batch: OnBatch | None = None,
) -> Evaluation:
    """Measure the patched checkpoint ``patched`` against its original on the images under ``data``.

    ``labels`` says where classes come from (``folder``, ``imagenet`` or ``none``; see the module
    docstring). The original is ``teacher`` (a timm name or ``torchvision:NAME``) with
    ``teacher_checkpoint``'s weights, by default the model and weights ``patched`` was converted
    from, else the library's cached pretrained weights, as ``heal`` finds its teacher.
    ``batch_size`` (per process under torchrun), ``workers`` (DataLoader processes) and
    ``device`` (default: the GPU if any) work as in ``heal``. ``on_batch(done, total)`` is
    called after every batch (on process 0) with the images done so far of all."""
    labels = choice(Labels, labels, "labels")
    _check_options(batch_size, workers)
    dev = pick_device(device)
    found = labelled_files(data, labels)
    opened = open_patched(patched)
    check_classifier(opened, patched)
    original, weights = original_model(opened, patched, teacher, teacher_checkpoint)
    models = (opened.model.eval().to(dev), original.eval().to(dev))
    started = _process_group_started()
    rank, world = _distributed()
    config = data_config(opened.model, opened.model_name)
    batches = _batches(found, config, batch_size, rank, world, workers, dev.type == "cuda")
    total = len(found.files)

    def progress(done: int) -> None:
        if on_batch is not None and rank == 0:
            on_batch(min(done * world, total), total)

    widths: list[int] = []  # the logits' width, seen on the first batch

    def check(p: torch.Tensor, o: torch.Tensor) -> None:
        _check_logits(p, o, found, labels, str(patched))
        widths.append(p.shape[1])

    sums, seconds = _all_processes(*_measure(models, batches, check, dev, progress), world)
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    figures = dict(zip(_SUMS, sums, strict=True))
    return Evaluation(
        str(patched), opened.model_name, str(data), labels, int(figures["images"]),
        widths[0] if widths else found.classes or 0, _scores(figures, seconds[0], "patched", found),
        _scores(figures, seconds[1], "original", found), weights,
        figures["agree"] / total, figures["cosine"] / total, figures["kl"] / total,
        str(dev), _notes(found, figures), rank, world,
    )  # fmt: skip


def _notes(found: Labelled, figures: dict[str, float]) -> tuple[str, ...]:
    """Why top-1/top-5 are missing, and how many images gave a model non-finite logits."""
    notes = [found.note] if found.note else []
    for which in ("patched", "original"):
        bad = int(figures[f"{which}_nonfinite"])
        if bad:
            notes.append(
                f"{bad} of {int(figures['images'])} images gave non-finite (NaN or infinite) logits from "
                f"the {which} model: they count as misses and disagreements, and the logit cosine and KL "
                "are undefined (null)."
            )
    return tuple(notes)


def _process_group_started() -> bool:
    """Whether this call will start the process group (torchrun, and none is started yet)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    import torch.distributed as dist

    return not dist.is_initialized()


def _scores(figures: dict[str, float], seconds: float, which: str, found: Labelled) -> Scores:
    """One model's accuracy (None without labels) and speed, from the pass's sums."""
    n = figures["images"]
    labelled = found.targets is not None
    return Scores(
        figures[f"{which}_top1"] / n if labelled else None,
        figures[f"{which}_top5"] / n if labelled else None,
        n / seconds if seconds > 0 else float("inf"),
    )
