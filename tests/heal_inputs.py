"""What the heal and calibration tests read: seeded noise images, and a teacher checkpoint
with its SE-to-ECA conversion saved beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from randomised import randomise_
from safetensors.torch import save_file

from eca_surgery import convert


def noise_images(folder: Path, count: int, size: int = 32, seed: int = 0, classes: int = 0) -> Path:
    """Write ``count`` RGB PNGs of ``size`` x ``size`` seeded noise into ``folder`` (spread over
    ``classes`` subfolders ``c0``, ``c1``, ... when given) and return ``folder``."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        where = folder / f"c{i % classes}" if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(pixels).save(where / f"{i}.png")
    return folder


def heal_inputs(
    root: Path,
    model_kwargs: dict[str, Any],
    images: int = 8,
    classes: int = 0,
    randomise: bool = True,
    **convert_options: Any,
) -> tuple[Path, Path, Path]:
    """(root, patched, teacher): a seresnet18 teacher checkpoint (weights and buffers
    randomised unless told not to), its SE-to-ECA conversion saved as ``patched.safetensors``
    with its source recorded, and ``images`` noise images in ``root / "images"``."""
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    model = timm.create_model("seresnet18", pretrained=False, **model_kwargs)
    save_file((randomise_(model) if randomise else model).state_dict(), teacher)
    noise_images(root / "images", images, classes=classes)
    conv = convert("seresnet18", "se-to-eca", checkpoint=teacher, **convert_options, **model_kwargs)
    return root, conv.save(root / "patched.safetensors"), teacher
