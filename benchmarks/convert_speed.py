"""Convert time and peak memory: eca-surgery vs the naive path vs the I/O floor.

Each path runs in its own fresh process (peak RSS is per process), which first pays
the imports that every path pays (torch, timm, safetensors, eca_surgery), then times
only the work:

* naive: timm.create_model (random init of every weight), load_state_dict from the
  file, replace the SE blocks, save;
* ours: eca_surgery's convert (meta-device build, weights assigned from the file,
  plan, apply, output-shape and finite-value checks, FLOPs) and Conversion.save;
* ours (core): the same work as the naive path (no checks, FLOPs or timm-native search);
* floor: safetensors load_file + save_file of the same tensors, nothing else.

Paths run interleaved, ``--repeats`` times each; the table shows min and median wall
time, ratios of medians, and peak RSS. Every original tensor of ours is compared
bitwise with the naive path's output.

    python benchmarks/convert_speed.py                       # seresnext101_32x8d
    python benchmarks/convert_speed.py seresnextaa201d_32x8d --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
import torch, timm, safetensors.torch
from eca_surgery import apply_plan, convert, load_recipe, make_plan

path, name, ckpt, out = sys.argv[1:5]
recipe = load_recipe("se-to-eca")
torch.set_num_threads(torch.get_num_threads())
t0 = time.perf_counter()
if path == "naive":
    model = timm.create_model(name)
    model.load_state_dict(safetensors.torch.load_file(ckpt), strict=True)
    apply_plan(model, make_plan(model, recipe, name))
    safetensors.torch.save_file(model.state_dict(), out)
elif path in ("ours", "ours-core"):
    full = path == "ours"
    result = convert(name, recipe, checkpoint=ckpt, check=full, flops=full, timm_native=full)
    result.save(out, force=True)
else:
    safetensors.torch.save_file(safetensors.torch.load_file(ckpt), out)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PATHS = ("naive", "ours", "ours-core", "floor")


def run(path: str, name: str, ckpt: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, path, name, str(ckpt), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="seresnext101_32x8d")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import safetensors.torch
    import timm
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "source.safetensors"
        torch.manual_seed(0)
        safetensors.torch.save_file(timm.create_model(args.model).state_dict(), ckpt)
        size_mb = ckpt.stat().st_size / 2**20
        results: dict[str, list[dict]] = {p: [] for p in PATHS}
        for _ in range(args.repeats):
            for path in PATHS:
                results[path].append(run(path, args.model, ckpt, tmp / f"{path}.safetensors"))

        naive, ours = (safetensors.torch.load_file(tmp / f"{p}.safetensors") for p in ("naive", "ours"))
        original = safetensors.torch.load_file(ckpt)
        kept = [k for k in original if k in naive]
        identical = all(torch.equal(naive[k], ours[k]) and torch.equal(original[k], ours[k]) for k in kept)
        same_keys = naive.keys() == ours.keys()

    median = {p: statistics.median(r["seconds"] for r in results[p]) for p in PATHS}
    print(
        f"{args.model}: checkpoint {size_mb:.0f} MiB, {args.repeats} interleaved runs per path, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}"
    )
    print(f"{'path':<10} {'min s':>7} {'median s':>9} {'vs naive':>9} {'vs floor':>9} {'peak RSS MiB':>13}")
    for p in PATHS:
        secs = [r["seconds"] for r in results[p]]
        rss = max(r["peak_rss_mb"] for r in results[p])
        print(
            f"{p:<10} {min(secs):>7.2f} {median[p]:>9.2f} {median[p] / median['naive']:>9.2f} "
            f"{median[p] / median['floor']:>9.2f} {rss:>13.0f}"
        )
    print(
        f"original tensors bit-identical between ours and naive (and the checkpoint): {identical}; "
        f"same keys: {same_keys} ({len(kept)} original tensors compared)"
    )


if __name__ == "__main__":
    main()
