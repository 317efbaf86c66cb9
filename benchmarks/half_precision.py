"""Half-precision checkpoints: size, dtype on reload, and outputs against the float32 model.

A seresnext101_32x8d (random weights and random BatchNorm statistics, so every tensor
matters) is saved as a source checkpoint and converted SE-to-ECA twice, with the CLI's
default (float32) and with ``dtype="float16"`` (and ``"bfloat16"``). For each file: its size
and the ratio to the float32 file, the dtype ``load_patched`` gives back, and the largest
difference of its outputs from the float32 model's on a batch of random images, as an
absolute figure and relative to the largest float32 output.

    python benchmarks/half_precision.py                 # seresnext101_32x8d, ~2 min on 2 cores
    python benchmarks/half_precision.py seresnet50      # another timm model

Writes benchmarks/results/half_precision.md and prints it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from export_parity import randomised  # a sibling script: every weight and BN statistic random
from safetensors.torch import save_file

from eca_surgery import convert, load_patched

RESULTS = Path(__file__).parent / "results"
TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}  # relative to the largest output: ~3 and ~2 digits


def measure(name: str, folder: Path, images: int) -> list[dict]:
    """Convert ``name`` to float32, float16 and bfloat16 files and compare each with float32."""
    source = folder / "source.safetensors"
    save_file(randomised(timm.create_model(name, pretrained=False)).state_dict(), source)
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows, reference, full_size = [], None, None
    for dtype in ("float32", "float16", "bfloat16"):
        path, start = folder / f"{dtype}.safetensors", time.perf_counter()
        convert(
            name, "se-to-eca", checkpoint=source, dtype=dtype, output=path, flops=False, timm_native=False
        )
        seconds = time.perf_counter() - start
        model = load_patched(path)
        dtypes = sorted(
            {
                str(t.dtype).removeprefix("torch.")
                for t in model.state_dict().values()
                if t.is_floating_point()
            }
        )
        with torch.no_grad():
            out = model(x.to(getattr(torch, dtype))).float()
        reference = out if reference is None else reference
        full_size = full_size or path.stat().st_size
        diff = (out - reference).abs().max().item()
        rel = diff / reference.abs().max().item()
        ok = dtype == "float32" or rel <= TOLERANCE[dtype]
        rows.append(
            dict(dtype=dtype, size=path.stat().st_size, ratio=path.stat().st_size / full_size, loaded=dtypes,
                 max_abs=diff, max_rel=rel, ok=ok, seconds=seconds)
        )  # fmt: skip
        print(f"{dtype}: {rows[-1]}", flush=True)
    return rows


def table(name: str, rows: list[dict], images: int) -> str:
    lines = [
        f"# Half-precision checkpoints of {name} (se-to-eca, random weights and BN statistics)",
        "",
        f"Outputs compared with the float32 file's on {images} random 3x224x224 images "
        f"(torch {torch.__version__}, CPU). Tolerance on max rel: float16 {TOLERANCE['float16']:g}, "
        f"bfloat16 {TOLERANCE['bfloat16']:g}.",
        "",
        "| dtype | file MiB | size / float32 | load_patched dtype | max abs diff | max rel diff | within tolerance | convert s |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['size'] / 2**20:.1f} | {r['ratio']:.4f} | {', '.join(r['loaded'])} | "
            f"{r['max_abs']:.3g} | {r['max_rel']:.3g} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="seresnext101_32x8d")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.model, Path(tmp), args.images)
    text = table(args.model, rows, args.images)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "half_precision.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
