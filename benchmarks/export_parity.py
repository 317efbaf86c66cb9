"""Export converted models to ONNX and torch.export, and show they compute what PyTorch does.

For each model: random weights and random BatchNorm buffers (so a lost or reset tensor would
show), saved as a source checkpoint, converted by its recipe with ``eca_surgery.convert`` into a
checkpoint in a temporary folder, then exported with ``eca_surgery.export_checkpoint`` (dynamic
batch, height and width; traced at the model's default input size). The export itself runs
each file on batch 1 and 2 at the default size and at a second size (height +32, width +64)
and refuses a file above the tolerance: 1e-4 absolute for ONNX Runtime, 1e-5 for the
reloaded torch.export program.

    python benchmarks/export_parity.py            # ~5 min on 2 cores

Writes benchmarks/results/export_parity.md and .json, and prints the table.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from eca_surgery import ExportOptions, convert, export_checkpoint, parse_recipe

RESULTS = Path(__file__).parent / "results"
KEEP_GATE = """
version: 1
name: se-to-eca-keep-gate
rules:
  - action: replace
    select: {se: true}
    eca: {gate: keep}
"""
MODELS = [  # (model, recipe, label)
    ("seresnet50", "se-to-eca", "se-to-eca"),
    ("efficientnet_b0", "se-to-eca", "se-to-eca"),
    ("mobilenetv3_large_100", KEEP_GATE, "se-to-eca, gate: keep (hard-sigmoid ECA)"),
    ("resnet50", "eca-after-stages", "eca-after-stages"),
    ("torchvision:mobilenet_v3_large", "se-to-eca", "se-to-eca"),
]


@torch.no_grad()
def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter and float buffer random (BN running stats included)."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked" or not t.is_floating_point():
            continue
        if leaf == "running_var" or (leaf == "weight" and t.dim() == 1):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif t.dim() <= 1:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * t[0].numel() ** -0.5)
    return model


def build(name: str) -> torch.nn.Module:
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def run_model(name: str, recipe: str, folder: Path) -> dict:
    source, patched = folder / "source.safetensors", folder / "patched.safetensors"
    save_file(randomised(build(name)).state_dict(), str(source))
    convert(name, parse_recipe(recipe) if "\n" in recipe else recipe, checkpoint=source, output=patched)
    start = time.perf_counter()
    result = export_checkpoint(
        patched, onnx=folder / "m.onnx", torch_export=folder / "m.pt2", options=ExportOptions()
    )
    return {**result.to_dict(), "total_seconds": time.perf_counter() - start}


def table(reports: list[dict]) -> list[str]:
    lines = [
        "| model | recipe | format | seconds | dynamic | input | max abs | max rel | ok |",
        "|---|---|---|---:|---|---|---:|---:|---|",
    ]
    for report in reports:
        for fmt in report["formats"]:
            dims = ", ".join(f"{d['name']} {d['min']}..{d['max'] or 'inf'}" for d in fmt["dynamic"])
            for i, row in enumerate(fmt["rows"]):
                head = [report["model"], report["label"], fmt["format"], f"{fmt['seconds']:.1f}", dims]
                head = head if i == 0 else [""] * 5
                shape = "x".join(map(str, row["shape"]))
                ok = "yes" if row["ok"] else "NO"
                lines.append(
                    f"| {' | '.join(head)} | {shape} | {row['max_abs']:.2e} | {row['max_rel']:.2e} | {ok} |"
                )
    return lines


def main() -> None:
    reports = []
    for name, recipe, label in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            report = run_model(name, recipe, Path(tmp))
        report["label"] = label
        reports.append(report)
        worst = {f["format"]: max(r["max_abs"] for r in f["rows"]) for f in report["formats"]}
        print(f"{name}: {worst} in {report['total_seconds']:.1f} s", flush=True)
    header = [
        "# Export parity: ONNX Runtime and torch.export against PyTorch",
        "",
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; random weights "
        "and BN buffers; dynamic batch, height and width, traced at 2x3x224x224. Tolerances: 1e-4 "
        "absolute (ONNX), 1e-5 (torch.export); max rel is max abs over the largest output magnitude. "
        "Seconds: the export (torch.export: trace and save), not the parity runs.",
        "",
    ]
    lines = header + table(reports)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_parity.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "export_parity.json").write_text(json.dumps(reports, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
