"""Keep what a trained SE model learned: fit-se, identity init and heal, measured on a real dataset.

Part 1 trains small timm models on scikit-learn's digits. Part 2 converts them with
eca-surgery's Python API (the same code the CLI runs) and measures test accuracy and
top-1 agreement with the original: SE -> ECA with default init, with ``fit-se`` (without
and with the fold, ``fit-se+fold``), and along ``heal``; ECA inserted after the stages of the no-SE twin with default and
``identity`` init, and along ``heal``.

The 1797 8x8 digits (shipped inside scikit-learn, no download) are split 80/20, stratified,
``random_state=0``, upscaled with PIL to SxS RGB and written as an ordinary image folder
(``WORK/data/{train,test}/<label>/<idx>.png``), which is what ``eca-surgery`` reads. Each model
is a timm model built with ``pretrained=False`` and kwargs (``num_classes=10`` and a
``pretrained_cfg_overlay``) that make timm's eval transform, resolved from the model, leave
the SxS PNGs unchanged in size; the train/test tensors are read back from the folder through
that very transform. Trained weights go to ``WORK/<model>.safetensors`` and the kwargs to
``WORK/<model>.json``.

    python benchmarks/heal_digits.py --work /tmp/heal   # ~15 min on 2 idle cores

A second table gives, per SE-replacing method, the mean per-block R² of the channel scales
the converted blocks apply against the SE's on the held-out images (``channel_scale_r2``),
the same on the calibration images and the pre-gate R² from the init record, and the logit
cosine. Training is skipped when WORK already holds the trained checkpoints. Results go to
``benchmarks/results/heal_digits.{md,json}`` and, with matplotlib, ``heal_digits.png``.

Needs the ``bench`` extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

MODELS = ("seresnet18", "resnet18")  # an SE network and its no-SE twin
SIZE = 48  # the last stage of a ResNet still has a 2x2 map (1x1 at 32)
MEAN, STD = 0.305, 0.376  # of the digits' pixels scaled to 0..1
SEED = 0
SEEDS = 5  # default-init conversions evaluated, seeds 0..SEEDS-1
FOLD = "+fold"  # a method name ending so: fit-se with the fold (eca_surgery.fold)


def split() -> dict[str, np.ndarray]:
    """The fixed stratified 80/20 split: images (N, 8, 8) in 0..16, labels, and indices into load_digits()."""
    from sklearn.datasets import load_digits  # here: fidelity_hard.py imports this script without sklearn
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    i_train, i_test = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=SEED)
    out: dict[str, np.ndarray] = {}
    for part, ii in (("train", i_train), ("test", i_test)):
        out[f"x_{part}"], out[f"y_{part}"], out[f"idx_{part}"] = digits.images[ii], digits.target[ii], ii
    return out


def to_rgb(image: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit (0..16) as an RGB PIL image of size x size (bilinear upscaling)."""
    grey = Image.fromarray(np.rint(image * 255.0 / 16.0).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.BILINEAR).convert("RGB")


def write_image_folders(root: Path, size: int) -> dict[str, Tensor]:
    """Write root/{train,test}/<label>/<idx>.png; return the same images in memory.

    Returns x_train/x_test as uint8 (N, 3, size, size), y_train/y_test and idx_train/idx_test as int64.
    """
    data = split()
    out: dict[str, Tensor] = {}
    for part in ("train", "test"):
        images = []
        for image, label, i in zip(data[f"x_{part}"], data[f"y_{part}"], data[f"idx_{part}"], strict=True):
            rgb = to_rgb(image, size)
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            rgb.save(folder / f"{i}.png")
            images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
        out[f"x_{part}"] = torch.stack(images)
        out[f"y_{part}"] = torch.as_tensor(data[f"y_{part}"], dtype=torch.int64)
        out[f"idx_{part}"] = torch.as_tensor(data[f"idx_{part}"], dtype=torch.int64)
    return out


def data_config(model: nn.Module) -> dict[str, Any]:
    return timm.data.resolve_data_config(model=model)


def load_folder(folder: Path, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Images of an image folder through timm's eval transform resolved from the model, as the tool reads them.

    Returns (x, y, idx) sorted by idx (the file stems), so the order does not depend on the folder reader.
    """
    transform = timm.data.create_transform(**data_config(model))
    dataset = timm.data.ImageDataset(str(folder), transform=transform)
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    idx = torch.tensor([int(Path(f).stem) for f in dataset.filenames()])
    order = idx.argsort()
    return torch.stack(xs)[order], torch.tensor(ys)[order], idx[order]


def normalise(x_uint8: Tensor, model: nn.Module) -> Tensor:
    """In-memory uint8 images, normalised as the model's timm data config says (what load_folder gives)."""
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def model_kwargs(size: int) -> dict[str, Any]:
    """JSON-serialisable timm.create_model kwargs that fit the model to the digits at size x size."""
    cfg = dict(
        input_size=[3, size, size], crop_pct=1.0, interpolation="bilinear", mean=[MEAN] * 3, std=[STD] * 3
    )
    return dict(num_classes=10, pretrained_cfg_overlay=cfg)


def build(name: str, size: int) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised timm model for the digits at size x size, and the kwargs it was built with."""
    kwargs = model_kwargs(size)
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = data_config(model)
    assert list(cfg["input_size"]) == [3, size, size] and cfg["crop_pct"] == 1.0, cfg
    image = Image.new("RGB", (size, size))
    assert timm.data.create_transform(**cfg)(image).shape == (3, size, size)
    return model, kwargs


def shift(x: Tensor, pixels: int, gen: torch.Generator) -> Tensor:
    """Shift each image by a random whole number of pixels in -pixels..pixels, edges replicated."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    max_shift: int | None = None,
    seed: int = SEED,
) -> nn.Module:
    """AdamW, linear warm-up then cosine decay to 0 per step, random shifts of up to size/16 pixels; eval mode after."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    max_shift = x_train.shape[-1] // 16 if max_shift is None else max_shift
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, min(steps_per_epoch, total // 5))  # one epoch, or a fifth of a short run
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(perm), batch_size):
            batch = perm[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(shift(x_train[batch], max_shift, gen)), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted labels, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (predictions(model, x) == y).float().mean().item()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, reference: Tensor) -> dict[str, float]:
    """Test accuracy; top-1 agreement with, and mean logit cosine to, the original's logits ``reference``."""
    with torch.no_grad():
        logits = torch.cat([model.eval()(x[i : i + 256]) for i in range(0, len(x), 256)])
    pred = logits.argmax(1)
    return {
        "accuracy": (pred == y).float().mean().item(),
        "agreement": (pred == reference.argmax(1)).float().mean().item(),
        "cosine": F.cosine_similarity(logits, reference, dim=1).mean().item(),
    }


def experiment(
    work: Path, name: str, recipe: str, inits: tuple[str, ...], heal_points: list[int], heal_args: dict
) -> dict[str, Any]:
    """Convert trained ``name`` with each init, then heal it, evaluating on the test folder at each point."""
    from eca_surgery import HealSettings, convert, heal, load_recipe

    kwargs = json.loads((work / f"{name}.json").read_text())
    source = work / f"{name}.safetensors"
    original = timm.create_model(name, **kwargs).eval()
    original.load_state_dict(load_file(source))
    x_test, y_test, _ = load_folder(work / "data" / "test", original)
    with torch.no_grad():
        reference = original(x_test)
    result: dict[str, Any] = {
        "model": name,
        "recipe": recipe,
        "original": evaluate(original, x_test, y_test, reference),
    }
    result["curves"] = {}
    for method in inits:
        init, fold = method.removesuffix(FOLD), method.endswith(FOLD)
        calib = {} if init == "default" else {"calib_data": work / "data" / "train", "calib_size": 256}
        conv = convert(
            name,
            load_recipe(recipe),
            checkpoint=source,
            init=init,
            fold=fold,
            check=False,
            flops=False,
            **calib,
            **kwargs,
        )
        patched = conv.save(work / f"{name}-{method}.safetensors", force=True)
        curve = [{"steps": 0, **evaluate(conv.model, x_test, y_test, reference), "seconds": 0.0}]
        if recipe == "se-to-eca":  # the applied channel scales, on the held-out images
            curve[0]["scale_r2_blocks"] = held_out_scale_r2(original, conv.model, x_test)
        if init == "default":  # default init is random: how much does the seed matter?
            seeds = [curve[0]] + [
                evaluate(
                    convert(name, load_recipe(recipe), checkpoint=source, seed=seed, check=False, flops=False, **kwargs).model,
                    x_test, y_test, reference,
                )
                for seed in range(1, SEEDS)
            ]  # fmt: skip
            curve[0]["seeds"] = {k: [s[k] for s in seeds] for k in ("accuracy", "agreement", "cosine")}
        healed, seconds = work / f"{name}-{method}-healed.safetensors", 0.0
        for i, steps in enumerate(heal_points):
            start = time.perf_counter()
            run = heal(
                patched, work / "data" / "train", healed, settings=HealSettings(steps=steps, **heal_args),
                resume=i > 0, force=True,
            )  # fmt: skip
            seconds += time.perf_counter() - start
            curve.append(
                {"steps": steps, **evaluate(run.model, x_test, y_test, reference), "seconds": seconds}
            )
            print(
                f"  {name} {method} heal {steps:4d} steps: accuracy {curve[-1]['accuracy']:.4f}", flush=True
            )
        result["curves"][method] = {"init_report": _short_init(conv.init), "curve": curve}
    return result


def held_out_scale_r2(original: nn.Module, patched: nn.Module, x: Tensor) -> list[float]:
    """Per SE block, the R² of the channel scales the converted block applies against the SE's, on ``x``."""
    from eca_surgery import channel_scale_r2

    return [f.r2 for f in channel_scale_r2(original, patched, list(x.split(64)))]


def _short_init(init: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "calibration", "fidelity", "fidelity_default")
    out = {k: init[k] for k in keep if k in init}
    if "blocks" in init:
        blocks = init["blocks"]
        out["mean_r2"] = sum(b["r2"] for b in blocks) / len(blocks)
        out["mean_scale_r2"] = sum(b["scale_r2"] for b in blocks) / len(blocks)
        out["folds"] = [b["fold"]["path"] if b["fold"] else None for b in blocks]
    return out


def scale_table(results: list[dict[str, Any]]) -> str:
    """Per SE-replacing method: mean per-block applied-scale R² (held-out and calibration),
    the plain kernel's pre-gate R² (calibration) and the logit cosine (held-out), before heal."""
    lines = [
        "| model | init | blocks folded | applied-scale R², held-out | applied-scale R², calibration "
        "| pre-gate R², calibration | logit cosine, held-out |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in results if r["recipe"] == "se-to-eca"):
        for method, c in r["curves"].items():
            start, report = c["curve"][0], c["init_report"]
            held = sum(start["scale_r2_blocks"]) / len(start["scale_r2_blocks"])
            folds = report.get("folds")
            folded = f"{sum(f is not None for f in folds)}/{len(folds)}" if folds else "-"
            calib = f"{report['mean_scale_r2']:.3f}" if "mean_scale_r2" in report else "-"
            pre = f"{report['mean_r2']:.3f}" if "mean_r2" in report else "-"
            lines.append(
                f"| {r['model']} | {method} | {folded} | {held:.3f} | {calib} | {pre} | {start['cosine']:.4f} |"
            )
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table: test accuracy and agreement with the original, before and after heal."""
    lines = [
        "| model | ECA | init | heal steps | test accuracy | % of original | top-1 agreement | logit cosine |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = r["original"]["accuracy"]
        lines.append(f"| {r['model']} | none (original) | - | - | {base:.4f} | 100.0 | 1.0000 | 1.0000 |")
        how = "replaces SE" if r["recipe"] == "se-to-eca" else "inserted after stages"
        for init, c in r["curves"].items():
            if "seeds" in c["curve"][0]:
                acc = c["curve"][0]["seeds"]["accuracy"]
                lines.append(
                    f"| {r['model']} | {how} | {init}, seeds 0-{len(acc) - 1} | 0 | {min(acc):.4f}-{max(acc):.4f} | "
                    f"{100 * min(acc) / base:.1f}-{100 * max(acc) / base:.1f} | "
                    f"{min(c['curve'][0]['seeds']['agreement']):.4f}-{max(c['curve'][0]['seeds']['agreement']):.4f} | "
                    f"{min(c['curve'][0]['seeds']['cosine']):.4f}-{max(c['curve'][0]['seeds']['cosine']):.4f} |"
                )
            for point in (c["curve"][0], c["curve"][-1]):
                lines.append(
                    f"| {r['model']} | {how} | {init} | {point['steps']} | {point['accuracy']:.4f} | "
                    f"{100 * point['accuracy'] / base:.1f} | {point['agreement']:.4f} | {point['cosine']:.4f} |"
                )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against heal steps, one panel per experiment; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        ax.axhline(r["original"]["accuracy"], color="black", linestyle="--", label=f"original {r['model']}")
        for init, c in r["curves"].items():
            ax.plot(
                [p["steps"] for p in c["curve"]],
                [p["accuracy"] for p in c["curve"]],
                marker="o",
                label=f"init {init}",
            )
        how = "SE replaced by ECA" if r["recipe"] == "se-to-eca" else "ECA inserted after stages"
        lowest = min(p["accuracy"] for c in r["curves"].values() for p in c["curve"])
        ylim = (max(0.0, lowest - 0.05 if lowest > 0.9 else 0.0), 1.005)
        ax.set(title=f"{r['model']}: {how}", xlabel="heal steps", ylabel="test accuracy", ylim=ylim)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="Work dir (default: a new temp dir).")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--heal-steps", type=int, nargs="+", default=[25, 50, 100, 200, 300])
    parser.add_argument("--train", default="norm", help="heal --train: eca, norm or all")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    work: Path = args.work or Path(tempfile.mkdtemp(prefix="heal_digits_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    mem = write_image_folders(work / "data", args.size)
    print(f"work dir {work}; {len(mem['y_train'])} train / {len(mem['y_test'])} test images at {args.size}px")
    for name in MODELS:
        if (work / f"{name}.safetensors").exists():
            continue
        model, kwargs = build(name, args.size)
        x_train, y_train, idx = load_folder(work / "data" / "train", model)
        x_test, y_test, _ = load_folder(work / "data" / "test", model)
        order = mem["idx_train"].argsort()
        assert torch.equal(idx, mem["idx_train"][order]) and torch.equal(y_train, mem["y_train"][order])
        assert torch.allclose(x_train, normalise(mem["x_train"][order], model), atol=1e-5)
        start = time.perf_counter()
        train(model, x_train, y_train, args.epochs)
        print(
            f"{name}: {args.epochs} epochs in {time.perf_counter() - start:.1f} s, test accuracy {accuracy(model, x_test, y_test):.4f}"
        )
        save_file(model.state_dict(), str(work / f"{name}.safetensors"))
        (work / f"{name}.json").write_text(json.dumps(kwargs, indent=2) + "\n")

    heal_args = {"train": args.train, "lr": args.lr, "batch_size": args.batch_size}
    results = [
        experiment(
            work,
            "seresnet18",
            "se-to-eca",
            ("default", "fit-se", "fit-se" + FOLD),
            args.heal_steps,
            heal_args,
        ),
        experiment(work, "resnet18", "eca-after-stages", ("default", "identity"), args.heal_steps, heal_args),
    ]
    md = table(results) + "\n\n" + scale_table(results)
    print(md)
    for r in results:
        for init, c in r["curves"].items():
            print(
                f"{r['model']} {init}: " + ", ".join(f"{p['steps']}: {p['accuracy']:.4f}" for p in c["curve"])
            )
    args.results.mkdir(exist_ok=True)
    settings = {"epochs": args.epochs, "size": args.size, "heal": heal_args, "heal_steps": args.heal_steps}
    (args.results / "heal_digits.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    (args.results / "heal_digits.md").write_text(md + "\n")
    if plot(results, args.results / "heal_digits.png"):
        print(f"plot: {args.results / 'heal_digits.png'}")


if __name__ == "__main__":
    main()
