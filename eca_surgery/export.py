"""Exporting a patched checkpoint for deployment, with a parity proof: ONNX and torch.export.

Each exported file is run on several inputs (batch 1 and 2, the traced input size and another
one) and compared with the PyTorch model it came from; a file whose outputs differ by more
than the tolerance is refused and not kept. Dynamic dimensions are inferred by
``torch.export`` (``Dim.AUTO``) from a batch-2 trace: the batch always, height and width where
the model allows it. ``max_rel`` is the largest absolute difference over the largest magnitude
of the PyTorch output (per input), so it stays meaningful where outputs are near zero.

The ONNX packages (onnx, onnxscript, onnxruntime) are the optional extra ``eca-surgery[onnx]``
and are imported only inside the functions that export or check ONNX.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import DType, choice
from .errors import CheckpointError, SurgeryError, summary

ONNX_ATOL = 1e-4  # ONNX Runtime against PyTorch, fp32: kernels differ (fused, reordered sums)
PROGRAM_ATOL = 1e-5  # a reloaded torch.export program runs the same ATen kernels
# in half precision (about 3 significant digits for float16, 2 for bfloat16), for outputs of order 1
HALF_ATOL = {
    "onnx": {torch.float16: 1e-2, torch.bfloat16: 5e-2},
    "torch.export": {torch.float16: 1e-3, torch.bfloat16: 1e-2},
}


def default_atol(fmt: str, model: nn.Module) -> float:
    """The tolerance a format gets without ``atol``: the fp32 one, or the half-precision one
    for a model in float16 or bfloat16."""
    from .models import float_dtype

    half = HALF_ATOL[fmt].get(float_dtype(model))
    return half if half is not None else (ONNX_ATOL if fmt == "onnx" else PROGRAM_ATOL)


ONNX_EXTRA = "pip install 'eca-surgery[onnx]'"
AXES = {0: "batch", 2: "height", 3: "width"}
TRACE_BATCH = 2  # torch.export specialises a dimension traced at size 1, so the trace uses 2
LEGACY_OPSET = 17


class ExportError(SurgeryError):
    """A model that cannot be exported as asked, or an export that failed its parity check."""


class ParityError(ExportError):
    """An exported file whose outputs differ from the PyTorch model's by more than the
    tolerance; ``result`` holds the figures. The file was not kept."""

    def __init__(self, message: str, result: FormatResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ExportOptions:
    """How to export: ``static`` (fixed shape, batch 1) or dynamic batch and, where the model
    allows it, dynamic height and width; ``input_size`` (C, H, W) to trace at (default: the
    model's); ``opset`` for ONNX (default: the exporter's); ``atol`` the largest absolute
    difference accepted (default: 1e-4 for ONNX, 1e-5 for torch.export); ``legacy`` falls back
    to the TorchScript ONNX exporter when the dynamo one fails; ``force`` replaces outputs."""

    static: bool = False
    input_size: tuple[int, int, int] | None = None
    opset: int | None = None
    atol: float | None = None
    legacy: bool = False
    force: bool = False
    seed: int = 0
    dtype: DType | str | None = None  # cast the model (and so the files) to this dtype first


@dataclass(frozen=True)
class ParityRow:
    """One input compared: its shape, the largest absolute and relative difference over
    every output, and whether ``max_abs`` is within the tolerance."""

    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool


@dataclass(frozen=True)
class DynamicDim:
    """A dimension of the input left dynamic: its axis, name and the range torch.export
    inferred (``max`` None: unbounded)."""

    axis: int
    name: str
    min: int
    max: int | None


@dataclass(frozen=True)
class FormatResult:
    """One exported file: its format (``onnx`` or ``torch.export``), path, the exporter used,
    the ONNX opset, the seconds the export took, the dynamic dimensions, the tolerance and the
    parity rows."""

    format: str
    path: str
    exporter: str
    opset: int | None
    seconds: float
    dynamic: tuple[DynamicDim, ...]
    atol: float
    rows: tuple[ParityRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready figures, ``ok`` included."""
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class ExportResult:
    """What ``export_checkpoint`` wrote: the checkpoint, its model, the traced input size,
    and one result per format."""

    checkpoint: str
    model: str
    input_size: tuple[int, int, int] | None  # None: no file traced (a hub folder only)
    static: bool
    formats: tuple[FormatResult, ...] = field(default_factory=tuple)
    hub_dir: str | None = None  # the hub folder written (checkpoint and model card), if asked

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (``export --json``)."""
        data = asdict(self)
        data["formats"] = [f.to_dict() for f in self.formats]
        data["ok"] = all(f.ok for f in self.formats)
        return data


@dataclass(frozen=True)
class _Traced:
    """The model's torch.export trace (None if it failed, with the reason) and the dynamic
    dimensions it inferred."""

    program: Any
    dynamic: tuple[DynamicDim, ...]
    seconds: float = 0.0
    failure: str | None = None


def export_onnx(path: str | Path, output: str | Path, options: ExportOptions | None = None) -> ExportResult:
    """Export the patched checkpoint ``path`` to ONNX file ``output``; see :func:`export_checkpoint`."""
    return export_checkpoint(path, onnx=output, options=options)


def export_program(
    path: str | Path, output: str | Path, options: ExportOptions | None = None
) -> ExportResult:
    """Export the patched checkpoint ``path`` with torch.export to ``output`` (.pt2); see
    :func:`export_checkpoint`."""
    return export_checkpoint(path, torch_export=output, options=options)


def export_checkpoint(
    path: str | Path,
    *,
    onnx: str | Path | None = None,
    torch_export: str | Path | None = None,
    hub_dir: str | Path | None = None,
    options: ExportOptions | None = None,
    model: nn.Module | None = None,
) -> ExportResult:
    """Export the patched checkpoint ``path`` (any file eca-surgery wrote) to ONNX (``onnx``)
    and/or a torch.export program (``torch_export``), each checked against the PyTorch model
    on several inputs (see the module docstring), and/or a Hugging Face hub folder
    (``hub_dir``: the checkpoint and a model card with its loading code, see ``hub``).
    Outputs are checked before any work and written atomically together at the end, or
    neither (a parity failure raises :class:`ParityError`). ``model``: a fresh, unpatched
    build, for a file saved from a module object (see ``open_patched``)."""
    from .hub import save_hub_dir
    from .outputs import written_together

    options = options or ExportOptions()
    _check_request(path, onnx, torch_export, hub_dir, options)
    patched = _open(path, model)
    _cast(patched.model, options.dtype, onnx is not None)
    size = traced = None
    if onnx is not None or torch_export is not None:
        size = _input_size(patched.model, options)
        traced = _trace(
            patched.model, size, options.static, need=torch_export is not None or not options.legacy
        )
    results: list[FormatResult] = []
    with written_together():
        if onnx is not None:
            results.append(_write_onnx(patched.model, size, traced, Path(onnx), options))
        if torch_export is not None:
            results.append(_write_program(patched.model, size, traced, Path(torch_export), options))
        hub = str(save_hub_dir(patched, hub_dir, options.force)) if hub_dir is not None else None
    return ExportResult(str(path), patched.model_name, size, options.static, tuple(results), hub)


def _cast(model: nn.Module, dtype: DType | str | None, onnx: bool) -> None:
    """Cast ``model`` to ``dtype`` (if given); an ExportError for ONNX in bfloat16, which
    ONNX's Conv does not take."""
    from .models import float_dtype

    if dtype is not None:
        model.to(getattr(torch, choice(DType, dtype, "dtype").value))
    if onnx and float_dtype(model) == torch.bfloat16:
        raise ExportError(
            "ONNX has no bfloat16 convolution (its Conv takes float16, float32 and float64), so a bfloat16 "
            "model cannot be exported to ONNX. Export it with `dtype='float16'` (or `dtype='float32'`) for ONNX, "
            "or keep bfloat16 with `torch_export`."
        )


def _check_request(
    path: str | Path,
    onnx: str | Path | None,
    torch_export: str | Path | None,
    hub_dir: str | Path | None,
    options: ExportOptions,
) -> None:
    """Refuse, before any work, a request without an output, bad options, outputs that may
    not be written, and ONNX without its packages."""
    from .hub import check_hub_dir
    from .outputs import check_file_output, check_outputs_apart

    if onnx is None and torch_export is None and hub_dir is None:
        raise ExportError(
            "Nothing to export: give `onnx` (an .onnx path), `torch_export` (a .pt2 path) and/or "
            "`hub_dir` (a folder)."
        )
    if hub_dir is not None:
        check_hub_dir(hub_dir, options.force)
    _check_options(options)
    check_outputs_apart(
        {"onnx": onnx, "torch_export": torch_export, "hub_dir": hub_dir}, {"checkpoint": path}
    )
    for name, output in (("onnx", onnx), ("torch_export", torch_export)):
        if output is not None:
            try:
                check_file_output(output, options.force)
            except SurgeryError as exc:  # name the parameter this output came from
                raise type(exc)(str(exc).replace("`output`", f"`{name}`")) from None
    if onnx is not None:
        onnx_modules()


def _check_options(options: ExportOptions) -> None:
    """Refuse options of the wrong type or range (they may come from Python, not the CLI)."""
    from .models import check_seed

    atol, opset = options.atol, options.opset
    if atol is not None and not (_is_number(atol) and math.isfinite(atol) and atol > 0):
        raise ExportError(f"`atol` must be a positive number, not {atol!r:.40}.")
    if opset is not None and not (_is_int(opset) and 7 <= opset <= 30):
        raise ExportError(f"`opset` {opset!r:.40} is not an ONNX opset version; use e.g. 18 (7 to 30).")
    if options.input_size is not None:
        check_size(options.input_size)
    check_seed(options.seed)
    if options.dtype is not None:
        choice(DType, options.dtype, "dtype")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


MAX_CHANNELS, MAX_SIDE = 64, 4096  # as --model-arg in_chans and img_size: a trace at batch 2 must fit memory


def check_size(size: tuple[int, ...]) -> tuple[int, int, int]:
    """``size`` if it is (C, H, W) with C at most 64 and sides at most 4096, else an ExportError."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 3
        or not all(
            _is_int(n) and 0 < n <= limit
            for n, limit in zip(size, (MAX_CHANNELS, MAX_SIDE, MAX_SIDE), strict=True)
        )
    ):
        raise ExportError(
            f"`input_size` {size!r} is not three positive integers C, H, W (C at most {MAX_CHANNELS}, "
            f"H and W at most {MAX_SIDE}), e.g. (3, 224, 224)."
        )
    return (int(size[0]), int(size[1]), int(size[2]))


def onnx_modules() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules (onnxscript is checked too: the dynamo
    exporter needs it); an ExportError naming the extra if any is missing."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - the dynamo exporter imports it
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the optional packages onnx, onnxscript and onnxruntime ({exc.name or exc} "
            f"is missing): {ONNX_EXTRA}"
        ) from None
    return onnx, onnxruntime


def _open(path: str | Path, model: nn.Module | None) -> Any:
    """The patched model of ``path``; a clear error for a file saved from a module object."""
    from .checkpoint import ModuleNeeded, open_patched

    try:
        return open_patched(path, model)
    except ModuleNeeded as exc:
        raise CheckpointError(
            f"{str(path)!r} holds a model converted from a module object ({exc.class_name}), which cannot "
            "be built from the file alone. Export it through the Python API: "
            "eca_surgery.export_checkpoint(path, ..., model=...) with a freshly built model of that class."
        ) from None


def _input_size(model: nn.Module, options: ExportOptions) -> tuple[int, int, int]:
    """The (C, H, W) to trace at, checked by running the model on it."""
    from .checks import run
    from .models import float_dtype, input_size

    size = check_size(options.input_size or input_size(model))
    if not options.static and min(size[1:]) < 2:  # torch.export always specialises a size of 1
        raise ExportError(
            f"The input size {_shape_text(size)} has a height or width of 1, which torch.export always "
            "fixes, so the file could not take other sizes. Pass a larger `input_size`, e.g. 3x224x224, "
            "or `static=True` for a fixed shape."
        )
    x = torch.zeros(1 if options.static else TRACE_BATCH, *size, dtype=float_dtype(model))
    try:
        with torch.no_grad():
            run(model, x)
    except SurgeryError as exc:
        raise ExportError(
            f"The input size {_shape_text(size)} does not fit the model: {exc} Pass an `input_size` the "
            "model takes, e.g. its default."
        ) from None
    return size


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines, warnings and logs (the result reports what matters):
    torch.export prints the whole graph on stderr when a trace fails (thousands of lines for a
    detection model) and logs each dimension it specialises."""
    previous = logging.root.manager.disable
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                yield
            finally:
                logging.disable(previous)


def _example(size: tuple[int, int, int], static: bool, model: nn.Module) -> torch.Tensor:
    from .models import float_dtype

    gen = torch.Generator().manual_seed(0)
    return torch.randn(1 if static else TRACE_BATCH, *size, generator=gen).to(float_dtype(model))


def _trace(model: nn.Module, size: tuple[int, int, int], static: bool, need: bool) -> _Traced:
    """torch.export's trace of ``model`` at ``size`` (batch 1 when ``static``, else batch 2
    with every axis of :data:`AXES` left to ``Dim.AUTO``) and the dimensions it kept dynamic.
    A failure raises an ExportError when ``need``, else is recorded (for the legacy exporter)."""
    x = _example(size, static, model)
    # a tuple, not a dict keyed by the argument's name: forward's first argument is ``x`` in timm,
    # ``input`` or ``images`` in torchvision's segmentation and detection models
    shapes = None if static else (dict.fromkeys(AXES, torch.export.Dim.AUTO),)
    start = time.perf_counter()
    try:
        with _quiet():
            program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, condensed
        if need:
            retry = "try " if static else "try `static=True`, or "
            raise ExportError(
                f"torch.export cannot trace the model at {_shape_text(tuple(x.shape))} ({summary(exc, 300)}). "
                "Models with data-dependent control flow (such as the box selection of a detection model) "
                f"do not export; {retry}`legacy=True` for the TorchScript ONNX exporter (ONNX only)."
            ) from None
        return _Traced(None, _assumed_dims(static), failure=summary(exc, 300))
    dynamic = () if static else _dynamic_dims(program)
    _check_not_too_small(dynamic, size)
    return _Traced(program, dynamic, time.perf_counter() - start)


def _assumed_dims(static: bool) -> tuple[DynamicDim, ...]:
    """The dimensions asked dynamic when no trace says which the model allows."""
    return () if static else tuple(DynamicDim(axis, name, 1, None) for axis, name in AXES.items())


def _dynamic_dims(program: Any) -> tuple[DynamicDim, ...]:
    """The axes of the traced input that stayed symbolic, with their inferred ranges."""
    user = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user)
    shape = node.meta["val"].shape
    dims = []
    for axis, name in AXES.items():
        dim = shape[axis]
        if isinstance(dim, int):
            continue
        bounds = program.range_constraints.get(dim.node.expr)
        low = int(bounds.lower) if bounds is not None else 0
        high = float(bounds.upper) if bounds is not None else math.inf  # int_oo: inf
        dims.append(DynamicDim(axis, name, low, int(high) if math.isfinite(high) else None))
    return tuple(dims)


def _check_not_too_small(dynamic: tuple[DynamicDim, ...], size: tuple[int, int, int]) -> None:
    """Refuse a trace whose height or width only holds up to the traced size: the model's
    last feature maps shrank to 1x1 there, and torch specialised the graph on it."""
    bounded = [d for d in dynamic if d.axis in (2, 3) and d.max is not None]
    if bounded:
        ranges = ", ".join(f"{d.name} {d.min}..{d.max}" for d in bounded)
        raise ExportError(
            f"The input size {_shape_text(size)} is too small for the model to export with a dynamic height "
            f"and width: traced there, the graph holds only for {ranges} (its last feature maps shrink to "
            "1x1 and torch specialises on that). Pass a larger `input_size`, e.g. 3x224x224 (at least "
            "twice the model's total stride), or `static=True` for a fixed shape."
        )


def parity_inputs(
    size: tuple[int, int, int], dynamic: tuple[DynamicDim, ...], static: bool, seed: int
) -> list[torch.Tensor]:
    """The inputs each exported file is checked on: the traced size at batch 1 and 2, and a
    second size (height +32, width +64) where height and width are dynamic; with ``static``,
    two inputs of the fixed shape (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = size
    if static:
        return [torch.randn(1, c, h, w, generator=gen) for _ in range(2)]
    axes = {d.axis for d in dynamic}
    batches = (1, 2) if 0 in axes else (TRACE_BATCH,)
    sizes = [(h, w)] + ([(h + 32, w + 64)] if {2, 3} <= axes else [])
    return [torch.randn(b, c, hh, ww, generator=gen) for hh, ww in sizes for b in batches]


def compare(
    model: nn.Module,
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    inputs: list[torch.Tensor],
    atol: float,
) -> tuple[ParityRow, ...]:
    """A parity row per input: ``run(x)`` (the exported file's outputs) against the model's."""
    from .checks import outputs
    from .models import float_dtype

    rows = []
    for x in inputs:
        x = x.to(float_dtype(model))
        with torch.no_grad():
            expected = [t.detach().float() for t in outputs(model(x))]
        _check_finite(expected, x)
        got = [torch.as_tensor(t).float() for t in _run_exported(run, x)]
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=True)):
            rows.append(ParityRow(tuple(x.shape), math.inf, math.inf, False))
            continue
        max_abs = max(
            float((g - e).abs().max()) if e.numel() else 0.0 for g, e in zip(got, expected, strict=True)
        )
        scale = max(float(e.abs().max()) if e.numel() else 0.0 for e in expected)
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        rows.append(ParityRow(tuple(x.shape), max_abs, max_rel, math.isfinite(max_abs) and max_abs <= atol))
    return tuple(rows)


def _check_finite(expected: list[torch.Tensor], x: torch.Tensor) -> None:
    """Refuse a model whose own outputs on ``x`` are not finite: nothing can be compared with them."""
    if all(bool(torch.isfinite(e).all()) for e in expected):
        return
    dtype = str(x.dtype).removeprefix("torch.")
    hint = (
        " float16 overflows above 65504: export with `dtype='float32'` (or `dtype='bfloat16'` for "
        "`torch_export`)."
        if x.dtype == torch.float16
        else " Check the checkpoint (verify it) and the model kwargs it was built with."
    )
    raise ExportError(
        f"The PyTorch model itself gives outputs that are not finite (inf or NaN) on a "
        f"{_shape_text(tuple(x.shape))} {dtype} input, so no exported file can be checked against it "
        f"and nothing was written.{hint}"
    )


def _run_exported(run: Callable[[torch.Tensor], list[Any]], x: torch.Tensor) -> list[Any]:
    """``run(x)``; an ExportError if the exported file cannot run ``x`` at all."""
    try:
        return run(x)
    except Exception as exc:  # noqa: BLE001 - the runtime's reason is the message
        raise ExportError(
            f"The exported file cannot run a {_shape_text(tuple(x.shape))} input ({summary(exc, 300)}), so it "
            "was not written. Pass a larger `input_size` or `static=True`."
        ) from None


def _refuse_if_off(result: FormatResult) -> FormatResult:
    """``result``, or a ParityError (the file is then not kept) when an input is off."""
    if result.ok:
        return result
    broken = next((r for r in result.rows if not math.isfinite(r.max_abs)), None)
    if broken is not None:  # no tolerance covers it
        raise ParityError(
            f"The {result.format} export does not give the PyTorch model's outputs on a "
            f"{_shape_text(broken.shape)} input: they differ in number or shape, or are not finite, so "
            f"{result.path!r} was not written. A model whose outputs depend on the data (such as the "
            "boxes a detection model keeps) cannot be exported with this check; export its backbone, "
            "or report this with the model and recipe.",
            result,
        )
    worst = max(result.rows, key=lambda r: r.max_abs)
    raise ParityError(
        f"The {result.format} export differs from the PyTorch model by up to {worst.max_abs:.3g} "
        f"(input {_shape_text(worst.shape)}), above the tolerance {result.atol:g}, so {result.path!r} was not "
        "written. Report this with the model and recipe; pass a larger `atol` only if that difference "
        "is acceptable for your use.",
        result,
    )


def _size_estimate(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    """``logits`` for a model with one output, else ``output_0``, ``output_1``..."""
    from .checks import outputs

    with torch.no_grad():
        count = len(outputs(model(x)))
    return ["logits"] if count == 1 else [f"output_{i}" for i in range(count)]


def _write_onnx(
    model: nn.Module, size: tuple[int, int, int], traced: _Traced, path: Path, options: ExportOptions
) -> FormatResult:
    """Export ``model`` to ONNX at ``path`` (atomically), check it with onnx.checker and
    compare ONNX Runtime with PyTorch; see :func:`export_checkpoint`."""
    from .outputs import atomic_write_file

    onnx, ort = onnx_modules()
    holder: list[FormatResult] = []

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        exporter, notes = produce_onnx(model, _example(size, options.static, model), traced, options, tmp)
        seconds = time.perf_counter() - start
        opset = _check_onnx(onnx, tmp, path)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        atol = options.atol if options.atol is not None else default_atol("onnx", model)

        def run(x: torch.Tensor) -> list[Any]:
            return session.run(None, {name: x.numpy()})

        rows = compare(model, run, parity_inputs(size, traced.dynamic, options.static, options.seed), atol)
        result = FormatResult("onnx", str(path), exporter, opset, seconds, traced.dynamic, atol, rows, notes)
        holder.append(_refuse_if_off(result))

    atomic_write_file(path, write, options.force, _size_estimate(model))
    return holder[0]


def _check_onnx(onnx: Any, tmp: Path, path: Path) -> int | None:
    """onnx.checker's verdict on the written file, and its default-domain opset."""
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker's reason is the message
        raise ExportError(
            f"The ONNX file for {str(path)!r} does not pass onnx.checker ({summary(exc, 300)}); it was not "
            "written. Try another `opset`, or `legacy=True`."
        ) from None
    return file_opset(tmp)


def file_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file imports."""
    import onnx

    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return next((o.version for o in opsets if o.domain in ("", "ai.onnx")), None)


def _opset_missed(tmp: Path, asked: int | None) -> str | None:
    """Why the dynamo exporter's file at ``tmp`` does not do: it holds another opset than the one
    ``asked`` (below 18 the exporter converts its opset-18 graph, and writes 18 where that fails)."""
    written = file_opset(tmp)
    if asked is None or written == asked:
        return None
    return (
        f"it wrote opset {written}, not the {asked} asked: it converts to opsets below 18 only where it can"
    )


def produce_onnx(
    model: nn.Module, x: torch.Tensor, traced: _Traced, options: ExportOptions, tmp: Path
) -> tuple[str, tuple[str, ...]]:
    """Write the ONNX file ``tmp`` with the dynamo exporter, or (``legacy``) the TorchScript
    one when that fails; return the exporter used and notes on a fallback."""
    names = _output_names(model, x)
    reason = traced.failure
    if reason is None:
        shapes = None if options.static else ({d.axis: d.name for d in traced.dynamic},)
        try:
            with _quiet():
                program = torch.onnx.export(
                    model,
                    (x,),
                    dynamo=True,
                    dynamic_shapes=shapes,
                    input_names=["x"],
                    output_names=names,
                    opset_version=options.opset,
                )
                program.save(str(tmp), external_data=False)
            reason = _opset_missed(tmp, options.opset)
            if reason is None:
                return "dynamo", ()
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, condensed
            reason = summary(exc, 300)
    if not options.legacy:
        raise ExportError(
            f"The dynamo ONNX exporter cannot export the model ({reason}). Pass `legacy=True` to fall back "
            f"to the TorchScript exporter, or try another `opset`{'' if options.static else ' or `static=True`'}."
        )
    _legacy_onnx(model, x, traced, options, tmp, names)
    return "torchscript", (f"The dynamo exporter failed ({reason}); the TorchScript exporter was used.",)


def _legacy_onnx(
    model: nn.Module, x: torch.Tensor, traced: _Traced, options: ExportOptions, tmp: Path, names: list[str]
) -> None:
    """Write ``tmp`` with the TorchScript ONNX exporter (``dynamo=False``)."""
    axes = None if options.static else {"x": {d.axis: d.name for d in traced.dynamic}}
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,
                input_names=["x"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=options.opset or LEGACY_OPSET,
            )
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, condensed
        raise ExportError(
            f"Neither ONNX exporter can export the model; the TorchScript one says: {summary(exc, 300)}."
        ) from None


def _write_program(
    model: nn.Module, size: tuple[int, int, int], traced: _Traced, path: Path, options: ExportOptions
) -> FormatResult:
    """Save the traced program at ``path`` (atomically) with torch.export.save, reload it with
    torch.export.load and compare it with the model; see :func:`export_checkpoint`."""
    from .outputs import atomic_write_file

    holder: list[FormatResult] = []

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        with _quiet(), open(tmp, "wb") as f:  # a file object: the temporary's name does not end in .pt2
            torch.export.save(traced.program, f)
        seconds = traced.seconds + time.perf_counter() - start  # the trace is the export
        with _quiet(), open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        atol = options.atol if options.atol is not None else default_atol("torch.export", model)

        def run(x: torch.Tensor) -> list[torch.Tensor]:
            from .checks import outputs

            with torch.no_grad():
                return outputs(loaded(x))

        rows = compare(model, run, parity_inputs(size, traced.dynamic, options.static, options.seed), atol)
        result = FormatResult(
            "torch.export", str(path), "torch.export", None, seconds, traced.dynamic, atol, rows
        )
        holder.append(_refuse_if_off(result))

    atomic_write_file(path, write, options.force, _size_estimate(model))
    return holder[0]
