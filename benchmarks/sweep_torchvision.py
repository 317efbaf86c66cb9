"""Convert every torchvision builder that has SE blocks, and check each converted model runs.

For each builder in ``torchvision.models.list_models()`` (or those matching the pattern
given): build it with ``weights=None`` (and ``weights_backbone=None``), random init, and
look for ``torchvision.ops.SqueezeExcitation`` modules (the quantizable one is a
subclass). For a model with SE blocks: run it at a small input, plan SE-to-ECA with
``eca_surgery.make_plan``, apply it, run it again, and check the output structure is
unchanged and finite, and that the parameter delta equals a count made here,
independently of eca-surgery: the parameters of every SE removed, plus the kernel size
the ECA paper's rule gives for each SE's ``fc1.in_channels``. Models above
``--max-params`` are built with empty weights on the meta device and checked there
(shapes only), to keep the sweep within a 2-core machine's time and memory.

Inputs: classification 1x3x64x64 (MaxViT 1x3x224x224, its window partition needs it);
detection, in eval mode, a list of one 3x128x128 image (the model resizes it), whose
outputs must keep their boxes, labels and scores; segmentation 1x3x64x64, whose ``out``
map must keep its shape; the quantizable MobileNetV3 runs in float.

    python benchmarks/sweep_torchvision.py                # all builders, ~2 min on 2 cores
    python benchmarks/sweep_torchvision.py 'mobilenet*'   # a subset

Writes benchmarks/results/tv_sweep.csv and .md, and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.ops import SqueezeExcitation

from eca_surgery import apply_plan, load_recipe, make_plan

SE_TO_ECA = load_recipe("se-to-eca")
RESULTS = Path(__file__).parent / "results"
SMALL = {"maxvit_t": 224}  # the side a classifier runs at where 64 is too small


@dataclass
class Row:
    """One builder's result; ``error`` says what failed (empty when it converted)."""

    model: str
    task: str
    se_blocks: int = 0
    edits: int = 0
    params_before: int = 0
    params_after: int = 0
    saving_pct: float = 0.0
    input: str = ""
    check: str = ""
    forward_ok: bool = False
    delta_ok: bool = False
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.forward_ok and self.delta_ok and not self.error


def task_of(name: str) -> str:
    """classification, detection, segmentation, quantization, video or optical_flow: the
    torchvision.models subpackage the builder lives in."""
    parts = torchvision.models.get_model_builder(name).__module__.split(".")
    return parts[2] if len(parts) > 3 else "classification"


def paper_kernel(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size (Wang et al., 2020, eq. 12): ``t = int(|(log2(C) + b) / gamma|)``,
    or ``t + 1`` where ``t`` is even; written out here, not taken from eca-surgery."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def se_modules(model: nn.Module) -> list[SqueezeExcitation]:
    return [m for m in model.modules() if isinstance(m, SqueezeExcitation)]


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_delta(model: nn.Module) -> int:
    """The parameter change SE-to-ECA must make: each SE's parameters go, one ECA kernel
    (no bias) of the paper's size for its channels comes."""
    return sum(paper_kernel(se.fc1.in_channels) - numel(se) for se in se_modules(model))


@contextmanager
def empty_weights() -> Iterator[None]:
    """Every parameter and buffer a module registers goes to the meta device (no memory,
    init is a no-op), while plain tensors a builder computes with (RegNet's block widths)
    stay on the CPU. Independent of eca-surgery's own meta build."""
    originals = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        originals[0](self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        originals[1](self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = originals


def build(name: str, meta: bool = False) -> nn.Module:
    """torchvision's builder, no weights downloaded; empty weights on the meta device with
    ``meta``; in eval mode (detection models then return boxes, not losses)."""
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    if not meta:
        return builder(**kwargs).eval()
    with empty_weights():
        return builder(**kwargs).eval()


def sample(name: str, task: str, device: str) -> tuple[Any, str]:
    """The small input a builder runs at, and its description."""
    if task == "detection":
        return [torch.rand(3, 128, 128, device=device)], "[3x128x128]"
    side = SMALL.get(name, 64)
    return torch.randn(1, 3, side, side, device=device), f"1x3x{side}x{side}"


def structure(out: Any, task: str) -> Any:
    """The output's structure: containers and keys, tensor shapes (detection: without the
    number of detections, which depends on the weights)."""
    if isinstance(out, dict):
        return {k: structure(v, task) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [structure(v, task) for v in out]
    return tuple(out.shape[1:] if task == "detection" else out.shape)


def tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    return [out]


def forward_fine(before: Any, after: Any, task: str) -> bool:
    """Same structure, finite values (on the meta device: the structure alone), and for
    detection the keys boxes, labels and scores with boxes of 4 coordinates."""
    same = structure(before, task) == structure(after, task)
    finite = all(t.is_meta or bool(torch.isfinite(t.float()).all()) for t in tensors(after))
    if task == "detection":
        same = same and all(
            set(d) == {"boxes", "labels", "scores"} and d["boxes"].shape[-1] == 4 for d in after
        )
    if task == "segmentation":
        same = same and after["out"].shape[-2:] == before["out"].shape[-2:]
    return same and finite


@torch.no_grad()
def check_builder(
    name: str, max_params: float = 100e6, expected: Callable[[nn.Module], int] = expected_delta
) -> Row | None:
    """Convert ``name`` and check it (see the module docstring); None without SE blocks.
    ``expected`` gives the delta the conversion must make (a test plants a wrong one)."""
    start, task = time.perf_counter(), task_of(name)
    model = build(name, meta=True)
    if not se_modules(model):
        return None
    row = Row(name, task, se_blocks=len(se_modules(model)), params_before=numel(model))
    real = row.params_before <= max_params
    if real:
        torch.manual_seed(0)
        model = build(name)
    want = expected(model)
    x, row.input = sample(name, task, "cpu" if real else "meta")
    row.check = "forward" if real else "meta forward (shapes)"
    before = model(x)
    plan = make_plan(model, SE_TO_ECA, f"torchvision:{name}")
    apply_plan(model, plan)
    after = model(x)
    row.edits, row.params_after = len(plan.edits), numel(model)
    row.saving_pct = round(100 * (1 - row.params_after / row.params_before), 1)
    row.forward_ok = forward_fine(before, after, task)
    delta = row.params_after - row.params_before
    row.delta_ok = delta == want == plan.params_delta and plan.params_after == row.params_after
    row.seconds = round(time.perf_counter() - start, 2)
    return row


def run_one(name: str, max_params: float) -> Row | None:
    """``check_builder``, with any exception recorded in the row rather than raised."""
    start = time.perf_counter()
    try:
        return check_builder(name, max_params)
    except Exception as exc:  # noqa: BLE001 - record and go on
        first = str(exc).splitlines()[0] if str(exc) else ""
        seconds = round(time.perf_counter() - start, 2)
        return Row(name, task_of(name), seconds=seconds, error=f"{type(exc).__name__}: {first}")


def summary(rows: list[Row], scanned: int, wall: float, max_params: float) -> list[str]:
    """The closing lines: how many converted, how they were checked, what failed and why."""
    failed = [r for r in rows if not r.ok]
    meta = sum(1 for r in rows if r.check.startswith("meta"))
    lines = [
        f"Scanned {scanned} torchvision {torchvision.__version__} builders in {wall:.0f} s: {len(rows)} have "
        f"SE blocks; converted {len(rows) - len(failed)}/{len(rows)} with the original output structure, "
        f"finite outputs and the independently counted parameter delta; {len(failed)} failed.",
        f"Checked with a real forward pass: {len(rows) - meta}; on the meta device (over "
        f"{max_params / 1e6:.0f}M parameters, shapes only): {meta}. SE blocks replaced: "
        f"{sum(r.edits for r in rows)}; parameters removed: {sum(r.params_before - r.params_after for r in rows):,}.",
    ]
    return lines + [f"FAILED {r.model}: {r.error or 'output structure or parameter delta'}" for r in failed]


COLUMNS = {
    "model": "model", "task": "task", "se_blocks": "SE blocks", "params_before": "params before",
    "params_after": "after", "saving_pct": "saving %", "input": "input", "check": "check",
    "forward_ok": "forward OK", "delta_ok": "delta check", "seconds": "seconds", "error": "error",
}  # fmt: skip


def cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def write(rows: list[Row], lines: list[str]) -> None:
    """benchmarks/results/tv_sweep.csv (every field) and tv_sweep.md (summary and table)."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "tv_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with open(RESULTS / "tv_sweep.md", "w") as f:
        f.write("# SE-to-ECA sweep over torchvision\n\n" + "\n\n".join(lines) + "\n\n")
        f.write("| " + " | ".join(COLUMNS.values()) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(cell(r, k) for k in COLUMNS) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pattern", nargs="?", default="*")
    parser.add_argument("--max-params", type=float, default=100e6, help="real forward up to this size")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # GoogLeNet's and Inception's init notes
    names = [n for n in torchvision.models.list_models() if fnmatch.fnmatchcase(n, args.pattern)]
    rows, start = [], time.perf_counter()
    for i, name in enumerate(names):
        row = run_one(name, args.max_params)
        if row is not None:
            rows.append(row)
            verdict = "ok" if row.ok else "FAILED " + (row.error or "structure/delta")
            print(f"[{i + 1}/{len(names)}] {name}: {verdict} ({row.seconds} s)", flush=True)
    lines = summary(rows, len(names), time.perf_counter() - start, args.max_params)
    write(rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
