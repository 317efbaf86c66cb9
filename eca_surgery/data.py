"""Images for calibration and healing: an image folder read with the model's own data config.

Images are found at any depth under the folder (labels are not needed: fitting and
distillation only compare the model with its original) and are resized, cropped and
normalised by timm's eval transform, resolved from the model's pretrained config (for a
torchvision model: from its builder's default weights entry, see :func:`torchvision_data_config`).
Without a folder, calibration falls back to seeded Gaussian-noise inputs.

torchvision's detection and segmentation models are fed images through their backbone only
(``locate.backbone_path``): that is where their SE blocks live, and the full models want lists of
images and end in postprocessing that has nothing to calibrate or distil.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import SurgeryError
from .models import TORCHVISION, dense_task, input_size
from .paths import stat_input

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(root: str | Path) -> list[Path]:
    """Every image file under ``root`` at any depth, sorted; an error if there is none."""
    root = Path(root)
    if stat_input(root, "Data folder") is None:
        raise SurgeryError(f"Data folder {str(root)!r} does not exist; pass a folder of images.")
    if not root.is_dir():
        raise SurgeryError(f"Data path {str(root)!r} is not a folder; pass a folder of images.")
    unreadable: list[str] = []
    files = []
    seen: set[tuple[int, int]] = set()  # folders already walked: linked folders are followed once
    for folder, dirs, names in os.walk(
        root, onerror=lambda e: unreadable.append(e.filename), followlinks=True
    ):
        st = _stat(folder)
        if st is None or (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a symbolic-link loop, or a folder reached twice
            continue
        seen.add((st.st_dev, st.st_ino))
        files += [
            Path(folder, n)
            for n in names
            if Path(n).suffix.lower() in IMAGE_EXTENSIONS and _is_regular_file(Path(folder, n))
        ]
    if unreadable:
        raise SurgeryError(
            f"Data folder {unreadable[0]!r} cannot be read (permission denied or vanished); "
            "fix its permissions or pass another folder."
        )
    if not files:
        raise SurgeryError(
            f"Data folder {str(root)!r} holds no images (looked at any depth for "
            f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder with images in it."
        )
    return sorted(files)


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _is_regular_file(path: Path) -> bool:
    """Whether ``path`` is (or links to) a regular file: a FIFO or device could block a
    reader forever, and a dangling link is no image."""
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_torchvision(model: nn.Module) -> bool:
    """Whether ``model`` is one of torchvision's models (by the package of its class)."""
    return type(model).__module__.startswith("torchvision.")


def data_config(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The input size, resize, crop and normalisation for ``model``, as timm's
    ``create_transform`` takes them: for a torchvision model (``name`` ``torchvision:ARCH``,
    or a model of a torchvision class), those of its builder's default weights; else what
    timm resolves from the model's pretrained config."""
    arch = name.partition(":")[2] if isinstance(name, str) and name.startswith(TORCHVISION + ":") else None
    if arch is not None or is_torchvision(model):
        return torchvision_data_config(model, arch)
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def torchvision_data_config(model: nn.Module, arch: str | None) -> dict[str, Any]:
    """The eval transform of torchvision builder ``arch``'s default weights (read from
    torchvision's weights table; nothing is downloaded), as timm's transform config.

    Classification: the weights' crop and resize (``crop_pct`` = crop / resize),
    interpolation, mean and std. Segmentation: the weights' resize side as a square input,
    mean and std. Detection (whose weights name no transform, the model normalises
    itself): the model's own ``transform.image_mean``/``image_std`` at
    ``models.DENSE_INPUT_SIZE``. Without a weights entry: ImageNet's mean and std at the
    model's default input size."""
    transform = _default_transform(arch)
    c, h, w = input_size(model)
    crop, resize = getattr(transform, "crop_size", None), getattr(transform, "resize_size", None)
    if crop:
        h = w = crop[0]
        crop_pct = crop[0] / resize[0] if resize else 1.0
    elif resize and dense_task(model) is not None:
        h = w = resize[0]  # segmentation: the short side is resized to this, kept square here
        crop_pct = 1.0
    else:
        crop_pct = 1.0 if dense_task(model) is not None else 0.875
    own = getattr(model, "transform", None)  # detection's GeneralizedRCNNTransform normalises inside
    mean = getattr(transform, "mean", None) or getattr(own, "image_mean", None) or IMAGENET_MEAN
    std = getattr(transform, "std", None) or getattr(own, "image_std", None) or IMAGENET_STD
    interpolation = getattr(getattr(transform, "interpolation", None), "value", "bilinear")
    return {
        "input_size": (c, h, w),
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def _default_transform(arch: str | None) -> Any:
    """The eval transform of ``arch``'s default weights entry (built from torchvision's table,
    no download), or None where the builder has none."""
    if arch is None:
        return None
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    return weights.transforms()


class ImageFiles(Dataset):
    """Images as model inputs. An unreadable file gives a zero image and the error text
    (instead of raising inside a DataLoader worker), so the caller can name the file."""

    def __init__(self, files: list[Path], config: dict[str, Any]) -> None:
        from timm.data import create_transform

        self.files = files
        self.shape = tuple(config["input_size"])
        self.transform = create_transform(**config, is_training=False)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                return self.transform(to_rgb(central(img))), ""
        except Exception as exc:  # PIL raises many types for a bad file; all mean "cannot read"
            return torch.zeros(self.shape), f"Image {str(path)!r} cannot be read ({exc})"


MAX_ASPECT = 8


def central(img):
    """``img``, or its central part if it is more than :data:`MAX_ASPECT` times longer than
    wide (or the reverse). The eval transform scales the short side to the input size and
    keeps the centre, so this changes nothing it keeps, and a 60000x1 image no longer
    becomes a multi-gigabyte resize."""
    w, h = img.size
    if min(w, h) == 0 or max(w, h) <= MAX_ASPECT * min(w, h):
        return img
    cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def to_rgb(img):
    """A PIL image as 8-bit RGB; 16- and 32-bit integer greyscale scaled down, not clipped."""
    from PIL import Image

    if img.mode.startswith("I"):  # 'I;16', 'I;16B', 'I': PIL's convert would clip at 255
        import numpy as np

        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or pixels.max() <= 65535 else float(pixels.max())
        img = Image.fromarray(np.rint(pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def checked(batch: tuple[torch.Tensor, list[str]]) -> torch.Tensor:
    """The images of a batch from ``ImageFiles``; an error naming the first unreadable file."""
    images, errors = batch
    bad = [e for e in errors if e]
    if bad:
        raise SurgeryError(f"{bad[0]}; remove or replace the file, or pass another folder.")
    return images


def folder_loader(
    dataset: ImageFiles, batches: list[list[int]], workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A loader that yields exactly ``batches`` (lists of indices), in order. Its workers ignore
    SIGTERM (see :func:`_worker_ignores_sigterm`)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_ignores_sigterm if workers else None,
    )


def _worker_ignores_sigterm(worker_id: int) -> None:
    """A SIGTERM sent to the whole process group (``kill -- -PGID``, a job scheduler) would kill
    the workers first, and torch then raises "worker killed" tracebacks in the main process
    while it is stopping cleanly. The main process stops them itself (and they exit when it dies)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def calibration_batches(
    model: nn.Module,
    data: str | Path | None,
    count: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    files: list[Path] | None = None,
    name: str | None = None,
) -> tuple[list[torch.Tensor], str]:
    """``count`` calibration inputs in batches, and a description of where they came from.

    From folder ``data`` (whose ``image_files`` may be passed as ``files``): a seeded
    random choice of ``count`` images (all if fewer), transformed by ``data_config(model,
    name)`` (``name``: the model's name, which finds a torchvision builder's weights). Without it: seeded standard-normal
    inputs at the model's default input size, which match the statistics of normalised
    images only roughly.
    """
    gen = torch.Generator().manual_seed(seed)
    if data is None:
        shape = input_size(model)
        x = torch.randn(count, *shape, generator=gen)
        what = f"synthetic: {count} Gaussian-noise inputs of {'x'.join(map(str, shape))} (no calibration images given)"
        return list(x.split(batch_size)), what
    files = files if files is not None else image_files(data)
    config = data_config(model, name)
    if len(files) > count:
        files = [files[i] for i in sorted(torch.randperm(len(files), generator=gen)[:count].tolist())]
    dataset = ImageFiles(files, config)
    order = list(range(len(files)))
    loader = folder_loader(dataset, [order[i : i + batch_size] for i in range(0, len(order), batch_size)])
    size = "x".join(map(str, config["input_size"]))
    return [checked(b) for b in loader], f"{len(files)} images from {str(data)!r} at {size}"


def epoch_batches(
    count: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded shuffle cut into global batches of
    ``batch_size * world`` (the last partial one dropped unless it is the only one)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    step = batch_size * world
    starts = range(0, max(count - step, 0) + 1, step)
    return [order[s : s + step][rank::world] for s in starts]


def training_batches(
    dataset: ImageFiles,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """An endless, resumable stream of batches: step ``s`` always gets the same images."""
    per_epoch = len(epoch_batches(len(dataset), batch_size, seed, 0, rank, world))
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        batches = epoch_batches(len(dataset), batch_size, seed, epoch, rank, world)[skip:]
        for batch in folder_loader(dataset, batches, workers, pin_memory):
            yield checked(batch)
        epoch, skip = epoch + 1, 0
