"""Latency of the ECA block and of converted models, measured side by side (CPU, fp32).

1. The block used by eca-surgery (timm's EcaModule, kernel size passed explicitly)
   vs timm's EcaModule(channels=C), the article's reference ECABlock and timm's
   SEModule, at the four ResNet stage shapes, batch 8, NCHW and channels_last. Every
   ECA variant is first checked against the article's output (max abs diff < 1e-6).
2. Whole models: each converted model vs its SE original (seresnet50,
   efficientnet_b0), batch 1 and 8, NCHW.

Timings are torch.utils.benchmark medians (and mins), the variants measured in
rotating order over three rounds; ratios are of medians measured in the same run.
"ours" is timm's EcaModule class itself (kernel size passed explicitly), so against
"timm Eca" it runs identical code and any ratio away from 1.00 is noise.

    python benchmarks/eca_latency.py
"""

from __future__ import annotations

import argparse
import math
import statistics

import timm
import torch
from torch import nn
from torch.utils import benchmark

from eca_surgery import convert, load_recipe, make_eca

SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


class ArticleECABlock(nn.Module):
    """The reference code of the article."""

    def __init__(self, channels, gamma=2, b=1):
        super().__init__()
        k = int(abs((math.log(channels, 2) + b) / gamma))
        k = k if k % 2 else k + 1
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        v = self.avg_pool(x)
        v = self.conv(v.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(v)


def measure(fn, x, min_run_time: float) -> tuple[float, float]:
    for _ in range(3):  # warm up caches and allocator
        fn(x)
    timer = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, min(m.raw_times) / m.number_per_run * 1e3


def measure_interleaved(fns: dict, x, min_run_time: float, rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Median of per-round medians and overall min, the variants run in rotating order each round."""
    names = list(fns)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            runs[n].append(measure(fns[n], x, min_run_time / rounds))
    return {n: (statistics.median(m for m, _ in v), min(lo for _, lo in v)) for n, v in runs.items()}


@torch.no_grad()
def blocks(min_run_time: float) -> None:
    print("ECA block latency, batch 8, fp32, ms (median / min); ratio = ours / fastest correct ECA variant")
    print(
        f"{'shape':<18} {'layout':<14} {'ours':>13} {'timm Eca':>13} {'article':>13} {'timm SE':>13} {'ratio':>6}"
    )
    for c, s in SHAPES:
        ours = make_eca(c).eval()
        variants = {"ours": ours, "timm Eca": timm.layers.EcaModule(channels=c).eval()}
        variants["article"] = ArticleECABlock(c).eval()
        for name in ("timm Eca", "article"):
            variants[name].conv.weight.copy_(ours.conv.weight)
        variants["timm SE"] = timm.layers.SEModule(c).eval()
        for layout in ("NCHW", "channels_last"):
            x = torch.randn(8, c, s, s)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            ref = variants["article"](x)
            correct = [
                n for n in ("ours", "timm Eca", "article") if (variants[n](x) - ref).abs().max() < 1e-6
            ]
            t = measure_interleaved(variants, x, min_run_time)
            fastest = min(t[n][0] for n in correct)
            cells = " ".join(f"{t[n][0]:>6.3f}/{t[n][1]:<6.3f}" for n in variants)
            print(
                f"({c}, {s}, {s}){'':<{18 - len(f'({c}, {s}, {s})')}} {layout:<14} {cells} {t['ours'][0] / fastest:>6.2f}"
            )


@torch.no_grad()
def models(min_run_time: float) -> None:
    print("\nWhole-model latency, fp32, NCHW, ms (median / min); ratio = converted / SE original")
    print(f"{'model':<18} {'batch':>5} {'SE original':>15} {'ECA converted':>15} {'ratio':>6}")
    for name in ("seresnet50", "efficientnet_b0"):
        torch.manual_seed(0)
        original = timm.create_model(name).eval()
        converted = convert(name, load_recipe("se-to-eca"), check=False, flops=False).model.eval()
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            t = measure_interleaved({"se": original, "eca": converted}, x, min_run_time)
            a, b = t["se"], t["eca"]
            print(
                f"{name:<18} {batch:>5} {a[0]:>7.2f}/{a[1]:<7.2f} {b[0]:>7.2f}/{b[1]:<7.2f} {b[0] / a[0]:>6.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads")
    blocks(args.min_run_time)
    models(args.min_run_time)


if __name__ == "__main__":
    main()
