"""Convert every timm model that has SE blocks, and check each converted model runs.

For each model in ``timm.list_models()`` (or those matching the pattern given): build
it on the meta device and look for SE blocks; for a model with SE blocks, plan
SE-to-ECA, then build it for real (random init, ``pretrained=False``), run it at a
small input, apply the plan, run it again, and check the output shape is unchanged
and the parameter delta equals ECA weights added minus SE weights removed. Models
above ``--max-params`` are checked on the meta device (shapes only), to keep the
sweep within a 2-core machine's time and memory.

    python benchmarks/sweep_se_models.py            # all models, ~15 min on 2 cores
    python benchmarks/sweep_se_models.py 'seres*'   # a subset

Writes benchmarks/results/se_sweep.csv and .md, and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import Counter
from pathlib import Path

import timm
import torch

from eca_surgery import apply_plan, find_native, find_se_blocks, load_recipe, make_plan

SE_TO_ECA = load_recipe("se-to-eca")


def create_model(name: str, meta: bool = False) -> torch.nn.Module:
    """timm's model, on the meta device (no weights allocated) when ``meta``."""
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    return timm.create_model(name, pretrained=False)


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """The model's default input size (C, H, W) from its pretrained config."""
    return tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))


RESULTS = Path(__file__).parent / "results"
FIELDS = [
    "model", "se_classes", "se_blocks", "params_before", "params_after", "delta_ok",
    "input", "check", "output_shape", "shape_ok", "timm_native", "seconds", "error",
]  # fmt: skip


def _shapes(out) -> list:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [tuple(o.shape) for o in outs]


@torch.no_grad()
def check_model(name: str, max_params: int) -> dict | None:
    meta = create_model(name, meta=True)
    blocks = find_se_blocks(meta)
    if not blocks:
        return None
    row = {"model": name, "se_classes": " ".join(sorted({b.class_name.rsplit(".", 1)[-1] for b in blocks}))}
    row["se_blocks"] = len(blocks)
    plan = make_plan(meta, SE_TO_ECA, name)
    removed = sum(sum(p.numel() for p in b.module.parameters()) for b in blocks)
    row.update(params_before=plan.params_before, params_after=plan.params_after)
    row["delta_ok"] = plan.params_delta == sum(e.kernel_size for e in plan.edits) - removed
    real = plan.params_before <= max_params
    model = create_model(name).eval() if real else meta.eval()
    c, h, w = input_size(model)
    fixed = (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size", False)
    size = (c, h, w) if fixed else (c, min(h, 128), min(w, 128))
    x = torch.randn(1, *size, device="cpu" if real else "meta")
    try:
        before = _shapes(model(x))
    except Exception:  # noqa: BLE001 - some blocks (halo attention) need the default size
        size = (c, h, w)
        x = torch.randn(1, *size, device="cpu" if real else "meta")
        before = _shapes(model(x))
    apply_plan(model, plan)
    after = _shapes(model(x))
    if real:
        assert sum(p.numel() for p in model.parameters()) == plan.params_after
    native = find_native(name, {}, meta if not real else model, plan)
    row.update(
        input="x".join(map(str, size)),
        check="forward" if real else "meta forward (shapes)",
        output_shape=";".join("x".join(map(str, s)) for s in after),
        shape_ok=before == after,
        timm_native="" if native is None else str(native["kwargs"]),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pattern", nargs="?", default="*")
    parser.add_argument("--max-params", type=float, default=100e6, help="real forward up to this size")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, start = [], time.perf_counter()
    names = timm.list_models(args.pattern)
    for i, name in enumerate(names):
        t = time.perf_counter()
        try:
            row = check_model(name, int(args.max_params))
        except Exception as exc:  # noqa: BLE001 - record and go on
            row = {
                "model": name,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
        if row is not None:
            row["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(row)
            ok = row.get("shape_ok") and row.get("delta_ok")
            print(
                f"[{i + 1}/{len(names)}] {name}: {'ok' if ok else 'FAILED ' + str(row.get('error', ''))}",
                flush=True,
            )
    wall = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "se_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    failed = [r for r in rows if not (r.get("shape_ok") and r.get("delta_ok"))]
    classes = Counter(c for r in rows if "se_classes" in r for c in r["se_classes"].split())
    native = sum(1 for r in rows if r.get("timm_native"))
    summary = [
        f"Scanned {len(names)} timm {timm.__version__} models in {wall / 60:.1f} min: "
        f"{len(rows)} have SE blocks; {len(rows) - len(failed)} converted with the original output "
        f"shape and the expected parameter delta; {len(failed)} failed.",
        "SE classes (models): " + ", ".join(f"{c} {n}" for c, n in classes.most_common()) + ".",
        f"Checked with a real forward pass: {sum(1 for r in rows if r.get('check') == 'forward')}; "
        f"on the meta device (over {args.max_params / 1e6:.0f}M parameters): "
        f"{sum(1 for r in rows if str(r.get('check', '')).startswith('meta'))}. "
        f"timm can build the ECA variant itself for {native}.",
    ]
    summary += [f"FAILED {r['model']}: {r.get('error') or 'shape/delta mismatch'}" for r in failed]
    with open(RESULTS / "se_sweep.md", "w") as f:
        f.write("# SE-to-ECA sweep over timm\n\n" + "\n\n".join(summary) + "\n\n")
        f.write("| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in FIELDS) + " |\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
