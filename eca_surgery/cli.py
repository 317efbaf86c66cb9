"""The eca-surgery command line: a thin typer layer over ``eca_surgery.surgery``.

torch and timm are imported inside the commands that need them, so ``--help`` and
recipe commands start instantly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .choices import MAX_JOBS, MAX_WORKERS, DType, Init, ScanSource, Sort, Train
from .errors import StoppedBySignal, SurgeryError, with_flags
from .jsontext import loads_strict


class _Typer(typer.Typer):
    """A Typer app whose every command runs inside the CLI's one error boundary."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(command: Callable[..., Any]) -> Callable[..., Any]:
            register(_user_errors(command))
            return command

        return decorator


app = _Typer(
    name="eca-surgery",
    help="Replace the Squeeze-and-Excitation blocks of timm models with ECA, as a YAML recipe says.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def printable(text: str) -> str:
    """``text`` with control characters (but newlines) shown escaped, e.g. ``\\x1b``: messages
    quote names from untrusted files (state_dict keys, metadata), and those must never
    reach the terminal as escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c == "\n" or unicodedata.category(c) != "Cc" else ascii(c)[1:-1] for c in text)


class SafeConsole(Console):
    """A rich Console whose ``print`` shows the control characters of text arguments escaped."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


out = SafeConsole()
err = SafeConsole(stderr=True)

RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe YAML file, or the name of a bundled recipe (see `recipes`)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
FeaturesOpt = Annotated[
    bool,
    typer.Option("--features-only", help="Build MODEL as a timm feature extractor (features_only=True)."),
]
OutIndicesOpt = Annotated[
    Optional[str],
    typer.Option("--out-indices", help="Feature maps to return, e.g. 1,2,3,4 (implies --features-only)."),
]

ModelArgOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--model-arg",
        help="A timm.create_model kwarg as KEY=VALUE, VALUE read as JSON if it parses (e.g. num_classes=10); "
        "repeatable. Use the kwargs the source weights were trained with.",
    ),
]


ModelArg = Annotated[
    str,
    typer.Argument(help="timm or torchvision model name, e.g. seresnet50 or torchvision:mobilenet_v3_large."),
]
PatchedArg = Annotated[Path, typer.Argument(help="A checkpoint written by `eca-surgery convert`.")]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", help="Where to write the patched .safetensors checkpoint.")
]
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--checkpoint",
        "-c",
        help="Source weights of MODEL: .safetensors, or a .pth/.pt/.bin state_dict (read with weights_only=True).",
    ),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="Source weights: timm's pretrained weights (Hugging Face cache).")
]
NonStrictOpt = Annotated[
    bool,
    typer.Option(
        "--non-strict", help="Load what fits of a checkpoint that does not fit, and report the rest."
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show the plan only; build nothing, write nothing.")
]
TimmDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--timm-dir",
        help="Also write a timm/Hugging Face folder (config.json + model.safetensors) that plain "
        "timm loads with create_model('local-dir:DIR', pretrained=True).",
    ),
]
DTypeOpt = Annotated[
    Optional[DType],
    typer.Option(
        "--dtype",
        help="Store the weights as float32, float16 or bfloat16 (default: the dtype they have).",
        show_default=False,
    ),
]
InitOpt = Annotated[
    Init,
    typer.Option(
        help="New ECA kernels: default (PyTorch's init), fit-se (least-squares fit to the SE block "
        "each one replaces) or identity (inserted blocks start as the identity).",
    ),
]
FoldOpt = Annotated[
    bool,
    typer.Option(
        help="With --init fit-se: fold a fitted per-channel factor into the norm before each SE "
        "block or the conv after it, where exact (--no-fold: leave every original tensor).",
    ),
]
CalibDataOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--calib-data",
        help="Folder of images (any depth) for --init fit-se/identity; without it, seeded noise.",
    ),
]


def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    from .models import PYTHON_CONSTANTS, check_model_kwargs

    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SurgeryError(
                f"--model-arg {item!r} is not KEY=VALUE with a Python name as KEY, e.g. num_classes=10 "
                "or pretrained_cfg_overlay='{\"input_size\": [3, 64, 64]}'."
            )
        try:
            kwargs[key.strip()] = (
                PYTHON_CONSTANTS[value.strip()] if value.strip() in PYTHON_CONSTANTS else loads_strict(value)
            )
        except json.JSONDecodeError:  # not JSON at all: a plain string
            kwargs[key.strip()] = value
        except ValueError as exc:  # JSON, but too deep, with duplicate keys or a huge integer
            raise SurgeryError(f"--model-arg {item[:60]!r}: {exc}; give a plain JSON value.") from None
    return check_model_kwargs(kwargs, "--model-arg", library=None)  # checked again for the model named


def _model_kwargs(
    features_only: bool, out_indices: str | None, model_args: list[str] | None = None
) -> dict[str, Any]:
    kwargs = _parse_model_args(model_args)
    return kwargs | _feature_kwargs(features_only, out_indices)


def _feature_kwargs(features_only: bool, out_indices: str | None) -> dict[str, Any]:
    if out_indices is None:
        return {"features_only": True} if features_only else {}
    try:
        indices = [int(i) for i in out_indices.split(",") if i.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise SurgeryError(
            f"--out-indices {out_indices!r} is not a comma-separated list of integers, e.g. 1,2,3,4."
        )
    if len(set(indices)) != len(indices):
        raise SurgeryError(
            f"--out-indices {out_indices!r} repeats an index; give each feature map once, e.g. 1,2,3,4."
        )
    if not features_only:
        err.print(
            f"Note: --out-indices builds the model as a feature extractor (features_only=True, out_indices={indices})."
        )
    return {"features_only": True, "out_indices": indices}


def _file_path(value: str | None) -> Path | None:
    """An output file option as a Path; refused when it ends with a slash, which names a
    folder (Path would drop the slash and write a file of the folder's name)."""
    if value is None:
        return None
    if value.endswith(("/", os.sep)):
        raise SurgeryError(
            f"Output {value!r} ends with a slash, so it names a folder, not a file; give a file name "
            f"such as {value.rstrip('/' + os.sep) or '.'}/model.safetensors."
        )
    return Path(value)


# The API's parameter names that its messages write (see ``errors``), and this CLI's flags for them.
FLAGS = {
    "init": "--init",
    "calib_size": "--calib-size",
    "calib_data": "--calib-data",
    "checkpoint": "--checkpoint",
    "strict=False": "--non-strict",
    "pretrained": "--pretrained",
    "model_kwargs": "--model-arg",
    "features_only": "--features-only",
    "out_indices": "--out-indices",
    "output": "--output",
    "timm_dir": "--timm-dir",
    "force": "--force",
    "dry_run": "--dry-run",
    "teacher": "--teacher",
    "teacher_checkpoint": "--teacher-checkpoint",
    "steps": "--steps",
    "lr": "--lr",
    "train": "--train",
    "batch_size": "--batch-size",
    "temperature": "--temperature",
    "feature_weight": "--feature-weight",
    "seed": "--seed",
    "resume": "--resume",
    "save_every": "--save-every",
    "device": "--device",
    "workers": "--workers",
    "jobs": "--jobs",
    "timeout": "--timeout",
    "dtype": "--dtype",
    "hub_dir": "--hub-dir",
    "onnx": "--onnx",
    "torch_export": "--torch-export",
    "static": "--static",
    "input_size": "--input-size",
    "opset": "--opset",
    "atol": "--atol",
    "legacy": "--legacy",
}


# The text the user gave the running command: messages may quote it, and it is never rewritten.
_user_text: ContextVar[tuple[str, ...]] = ContextVar("user_text", default=())


def _texts(values: Any) -> tuple[str, ...]:
    """Every string or path among ``values``, in lists and dicts at any depth, as text."""
    texts: list[str] = []
    for value in values:
        if isinstance(value, dict):
            texts.extend(_texts(value.values()))
        elif isinstance(value, (list, tuple)):
            texts.extend(_texts(value))
        elif isinstance(value, (str, Path)):
            texts.append(str(value))
    return tuple(texts)


def _load_recipe(recipe: str) -> Any:
    """The recipe ``recipe`` names; its text (selectors, name) is the user's, kept as written
    in messages that quote it."""
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    _user_text.set(_user_text.get() + _texts([parsed.to_dict()]))
    return parsed


def _flagged(message: str) -> str:
    """A library message with its parameters named as this CLI's flags (``errors.with_flags``),
    the user's own text left as written."""
    return with_flags(message, FLAGS, keep=_user_text.get())


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with the CLI's error boundary: a SurgeryError becomes a one-paragraph
    message (parameters named as flags) and exit code 1, with no traceback; an interrupt
    or a clean stop on a signal exits with the shell's code for it."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        _user_text.set(_texts([*args, *kwargs.values()]))
        try:
            return command(*args, **kwargs)
        except StoppedBySignal as exc:  # stopped cleanly: the shell's code for the signal, like Ctrl-C's
            err.print(escape(_flagged(str(exc))), highlight=False, soft_wrap=True)
            raise typer.Exit(143 if exc.signal_name == "SIGTERM" else 130) from None
        except SurgeryError as exc:
            err.print(f"[bold red]Error:[/] {escape(_flagged(str(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            what, code = (
                ("Terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("Interrupted", 130)
            )
            err.print(f"{what}; outputs are written atomically, so nothing was left half-written.")
            raise typer.Exit(code) from None

    return run


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every
    exit path that cleans up after Ctrl-C (temporaries, heal's stop) runs for it too."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _print_notes(notes: list[str]) -> None:
    from .report import render_notes

    render_notes(err, [_flagged(note) for note in notes])


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _print_json(data: dict[str, Any]) -> None:
    """Print ``data`` as strict JSON: NaN and infinities become null (JSON has neither)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _show(report: dict[str, Any], json_out: bool, render: Callable[..., None]) -> None:
    """Print ``report`` as one JSON object, or lay it out with ``render(console, report)``."""
    if json_out:
        _print_json(report)
    else:
        render(out, report)


def _version(value: bool) -> None:
    if value:
        out.print(f"eca-surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Replace the Squeeze-and-Excitation blocks of timm models with ECA, as a YAML recipe says."""


@app.command()
def inspect(
    model: ModelArg,
    recipe: Annotated[
        Optional[str],
        typer.Option(
            "--recipe", "-r", help="A recipe (file or bundled name) whose plan to show; writes nothing."
        ),
    ] = None,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a model's SE blocks and, with --recipe, what the recipe would change. Writes nothing."""
    parsed = _load_recipe(recipe) if recipe else None
    kwargs = _model_kwargs(features_only, out_indices, model_arg)
    from .report import inspect_report, render_inspect
    from .surgery import inspect as inspect_model

    report = inspect_report(inspect_model(model, parsed, **kwargs))
    _show(report, json_out, render_inspect)


@app.command()
def convert(
    model: ModelArg,
    recipe: RecipeOpt = None,
    output: OutputOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    non_strict: NonStrictOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    seed: Annotated[int, typer.Option(help="Seed for new ECA weights and the check input.")] = 0,
    timm_dir: TimmDirOpt = None,
    init: InitOpt = Init.DEFAULT,
    calib_data: CalibDataOpt = None,
    calib_size: Annotated[int, typer.Option(min=1, help="How many calibration inputs to use.")] = 64,
    fold: FoldOpt = True,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
    dtype: DTypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert MODEL as the recipe says, check a forward pass, and save a safetensors checkpoint."""
    if recipe is None:
        raise SurgeryError(
            "convert needs --recipe: a recipe file or a bundled recipe name such as se-to-eca."
        )
    output = _file_path(output)
    if output is None and timm_dir is None and not dry_run:
        raise SurgeryError(
            "convert needs --output FILE.safetensors and/or --timm-dir DIR (or --dry-run to only "
            "show the plan)."
        )
    parsed = _load_recipe(recipe)
    kwargs = _model_kwargs(features_only, out_indices, model_arg)
    from .report import convert_notes, convert_report, leftover_notes, render_convert
    from .surgery import convert as convert_model

    result = convert_model(
        model,
        parsed,
        output=output,
        timm_dir=timm_dir,
        force=force,
        checkpoint=checkpoint,
        pretrained=pretrained,
        strict=not non_strict,
        dry_run=dry_run,
        seed=seed,
        init=init,
        calib_data=calib_data,
        calib_size=calib_size,
        fold=fold,
        dtype=dtype,
        **kwargs,
    )
    _print_notes(leftover_notes(result.leftovers) + convert_notes(result))
    report = convert_report(result)
    _show(report, json_out, render_convert)


@app.command()
def verify(
    path: PatchedArg,
    json_out: JsonOpt = False,
) -> None:
    """Rebuild a patched model from its checkpoint alone, load it strictly, and run it."""
    from .report import render_verify, verify_report
    from .surgery import verify as verify_checkpoint

    report = verify_report(*verify_checkpoint(path), path)
    _show(report, json_out, render_verify)


@app.command("recipes")
def list_recipes(json_out: JsonOpt = False) -> None:
    """List the bundled recipes, usable by name with --recipe."""
    from .recipe import bundled_recipes
    from .report import recipes_report, render_recipes

    report = recipes_report(bundled_recipes())
    _show(report, json_out, render_recipes)


class _RateColumn:
    """Builds a progress column showing a task's rate in models per second (rich's estimate)."""

    def __new__(cls) -> Any:
        from rich.progress import ProgressColumn
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} models/s" if speed else "", style="progress.data.speed")

        return Rate()


@contextmanager
def _scan_progress(total: int) -> Iterator[Callable[[Any], None]]:
    """A progress bar on stderr (models done of ``total``, the rate, the models being built),
    and the function that moves it to a scan's ``ScanProgress``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("", total=total)

        def show(state: Any) -> None:
            progress.update(task, completed=state.done, description=escape(", ".join(state.building)[:60]))

        yield show


@app.command()
def scan(
    pattern: Annotated[str, typer.Argument(help="Model-name pattern, e.g. 'seres*' (default: all).")] = "*",
    source: Annotated[
        ScanSource, typer.Option("--source", help="Scan timm's models or torchvision's builders.")
    ] = ScanSource.TIMM,
    sort: Annotated[Sort, typer.Option("--sort", help="Order rows by this.")] = Sort.SAVING,
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count GMACs before and after.")] = True,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Show only the first N rows.")
    ] = None,
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            max=MAX_JOBS,
            help="Worker processes building models (default: the cores available).",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=1, help="Seconds a model may take in a worker before it counts as failed."
        ),
    ] = 120.0,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Ignore the cache of earlier scans, and rewrite it.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Scan timm's models or torchvision's builders (on the meta device) for SE blocks and what
    SE-to-ECA would save. Each model's row is cached (ECA_SURGERY_CACHE moves the cache)."""
    from .report import render_scan, scan_report
    from .scan import available_cores, model_names, sort_rows
    from .scan import scan as scan_models

    jobs = jobs or available_cores()
    names = model_names(pattern, source, cache=True, refresh=refresh, warm=jobs > 1)
    with _scan_progress(len(names)) as show:
        result = scan_models(
            names, flops, jobs=jobs, timeout=timeout, cache=True, refresh=refresh, on_progress=show
        )
    _print_notes(result.notes)
    report = scan_report(sort_rows(result, sort), limit)  # counts of every model scanned; rows cut to --limit
    _show(report, json_out, render_scan)


DataOpt = Annotated[
    Path, typer.Option("--data", "-d", help="Folder of training images, at any depth; labels unused.")
]
HealOutputOpt = Annotated[str, typer.Option("--output", "-o", help="Where to write the healed checkpoint.")]
TeacherOpt = Annotated[
    Optional[str],
    typer.Option(
        help="The original model, as a timm name or torchvision:NAME (default: the one PATCHED was "
        "converted from)."
    ),
]
TeacherCheckpointOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--teacher-checkpoint",
        help="The teacher's weights (default: those PATCHED was converted from, else the cached "
        "pretrained weights).",
    ),
]
StepsOpt = Annotated[
    int, typer.Option(min=1, help="Optimizer steps in all (a resumed run counts earlier ones).")
]
TrainOpt = Annotated[
    Train, typer.Option(help="What trains: eca (new kernels), norm (those and norm layers) or all.")
]
FeatureWeightOpt = Annotated[
    float, typer.Option(min=0.0, help="Weight of an MSE loss on forward_features maps (0: logits only).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run that wrote OUTPUT, up to --steps.")
]
SaveEveryOpt = Annotated[int, typer.Option(min=0, help="Also write OUTPUT every N steps (0: at the end).")]
DeviceOpt = Annotated[
    Optional[str], typer.Option(help="Device, e.g. cpu or cuda:1 (default: the GPU if any).")
]
WorkersOpt = Annotated[int, typer.Option(min=0, max=MAX_WORKERS, help="DataLoader worker processes.")]


@app.command()
def heal(
    patched: PatchedArg,
    data: DataOpt,
    output: HealOutputOpt,
    teacher: TeacherOpt = None,
    teacher_checkpoint: TeacherCheckpointOpt = None,
    steps: StepsOpt = 200,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate (constant).")] = 1e-3,
    train: TrainOpt = Train.NORM,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per step (per process under torchrun).")
    ] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="Softmax temperature of the KL loss.")] = 1.0,
    feature_weight: FeatureWeightOpt = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the image order.")] = 0,
    resume: ResumeOpt = False,
    save_every: SaveEveryOpt = 0,
    device: DeviceOpt = None,
    workers: WorkersOpt = 0,
    force: ForceOpt = False,
    dtype: DTypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Distil the original model into a patched one on unlabelled images, training only what --train says."""
    from .healing import HealSettings
    from .healing import heal as heal_model
    from .report import heal_report, leftover_notes, render_heal

    settings = HealSettings(
        steps=steps,
        lr=lr,
        train=train.value,
        batch_size=batch_size,
        temperature=temperature,
        feature_weight=feature_weight,
        seed=seed,
        dtype=dtype,
    )
    output = _file_path(output)
    with _heal_progress(steps) as on_step:
        result = heal_model(
            patched,
            data,
            output,
            teacher=teacher,
            teacher_checkpoint=teacher_checkpoint,
            settings=settings,
            resume=resume,
            force=force,
            save_every=save_every,
            device=device,
            workers=workers,
            on_step=on_step,
        )
    if result.rank == 0:
        _print_notes(leftover_notes(result.leftovers))
        _show(heal_report(result, output), json_out, render_heal)


@contextmanager
def _heal_progress(steps: int) -> Iterator[Callable[[int, int, float, float], None]]:
    """A progress bar on stderr (on a terminal), and the ``on_step`` callback that moves it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("healing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}, {task.fields[speed]:.1f} img/s"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("heal", total=steps, loss=float("nan"), speed=0.0)

        def on_step(step: int, total: int, loss: float, speed: float) -> None:
            progress.update(task, completed=step, loss=loss, speed=speed)

        yield on_step


OnnxOpt = Annotated[
    Optional[str],
    typer.Option("--onnx", help="Write an ONNX file here (dynamo exporter), checked in ONNX Runtime."),
]
TorchExportOpt = Annotated[
    Optional[str],
    typer.Option("--torch-export", help="Write a torch.export program here (.pt2), reloaded and checked."),
]
HubDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--hub-dir",
        help="Write a Hugging Face hub folder here: the checkpoint and a model card with its loading code.",
    ),
]
StaticOpt = Annotated[
    bool,
    typer.Option("--static", help="A fixed input shape (batch 1) instead of dynamic batch/height/width."),
]
InputSizeOpt = Annotated[
    Optional[str], typer.Option("--input-size", help="Input size to trace at, CxHxW (default: the model's).")
]
OpsetOpt = Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's).")]
AtolOpt = Annotated[
    Optional[float],
    typer.Option(
        "--atol", help="Largest absolute difference accepted (default 1e-4 ONNX, 1e-5 torch.export)."
    ),
]
LegacyOpt = Annotated[
    bool, typer.Option("--legacy", help="If the dynamo ONNX exporter fails, use the TorchScript one.")
]


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    """``--input-size`` 3x224x224 as a tuple of integers (checked by the library)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SurgeryError(f"--input-size {text!r} is not CxHxW, e.g. 3x224x224.") from None


@app.command()
def export(
    path: PatchedArg,
    onnx: OnnxOpt = None,
    torch_export: TorchExportOpt = None,
    hub_dir: HubDirOpt = None,
    static: StaticOpt = False,
    input_size: InputSizeOpt = None,
    opset: OpsetOpt = None,
    atol: AtolOpt = None,
    legacy: LegacyOpt = False,
    force: ForceOpt = False,
    dtype: DTypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export PATCHED to ONNX and/or torch.export, and prove each file computes what the model does."""
    if onnx is None and torch_export is None and hub_dir is None:  # a usage error: exit code 2
        raise typer.BadParameter(
            "give --onnx OUT.onnx, --torch-export OUT.pt2 and/or --hub-dir DIR.", param_hint="export"
        )
    from .export import ExportOptions, ParityError, export_checkpoint
    from .export_report import render_export, render_format

    size = _parse_size(input_size)
    options = ExportOptions(static, size, opset, atol, legacy, force, dtype=dtype)
    try:
        result = export_checkpoint(
            path,
            onnx=_file_path(onnx),
            torch_export=_file_path(torch_export),
            hub_dir=hub_dir,
            options=options,
        )
    except ParityError as exc:  # show the figures that made it fail, then the error
        render_format(err, exc.result.to_dict())
        raise
    _show(result.to_dict(), json_out, render_export)


recipe_app = _Typer(help="Check recipes and print the recipe format's JSON Schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("check")
def recipe_check(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or bundled recipe name.")],
    json_out: JsonOpt = False,
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Also resolve it against this timm model.")
    ] = None,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
) -> None:
    """Validate a recipe; with --model, show the plan it gives (built on the meta device, no weights)."""
    from .report import recipe_check_report, render_recipe_check

    parsed = _load_recipe(recipe)
    plan = None
    if model is not None:
        from .surgery import plan_recipe

        plan = plan_recipe(model, parsed, **_model_kwargs(features_only, out_indices, model_arg))
    report = recipe_check_report(parsed, plan)
    _show(report, json_out, functools.partial(render_recipe_check, recipe=parsed))


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe format's JSON Schema (for editors that complete and check YAML)."""
    from .recipe import recipe_schema as schema

    _print_json(schema())


def main() -> None:
    """The console entry point: SIGTERM is handled like Ctrl-C (exit code 143)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    app()
