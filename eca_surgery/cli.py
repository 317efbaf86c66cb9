"""The eca-surgery command line: a thin typer layer over ``eca_surgery.surgery``.

torch and timm are imported inside the commands that need them, so ``--help`` and
recipe commands start instantly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import StoppedBySignal, SurgeryError, sample_keys
from .jsontext import loads_strict

app = typer.Typer(
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


def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SurgeryError(
                f"--model-arg {item!r} is not KEY=VALUE with a Python name as KEY, e.g. num_classes=10 "
                "or pretrained_cfg_overlay='{\"input_size\": [3, 64, 64]}'."
            )
        try:
            kwargs[key.strip()] = loads_strict(value)
        except json.JSONDecodeError:  # not JSON at all: a plain string
            kwargs[key.strip()] = value
        except ValueError as exc:  # JSON, but too deep, with duplicate keys or a huge integer
            raise SurgeryError(f"--model-arg {item[:60]!r}: {exc}; give a plain JSON value.") from None
    from .models import check_model_kwargs

    return check_model_kwargs(kwargs, "--model-arg")


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


@contextmanager
def _user_errors():
    """Turn SurgeryError into a one-paragraph message and exit code 1, with no traceback."""
    try:
        yield
    except StoppedBySignal as exc:  # stopped cleanly: the shell's code for the signal, like Ctrl-C's
        err.print(escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(143 if exc.signal_name == "SIGTERM" else 130) from None
    except SurgeryError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        what, code = ("Terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("Interrupted", 130)
        err.print(f"{what}; outputs are written atomically, so nothing was left half-written.")
        raise typer.Exit(code) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every
    exit path that cleans up after Ctrl-C (temporaries, heal's stop) runs for it too."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _clean_leftovers(*paths: Path) -> None:
    """Remove temporaries of ``paths`` left by killed runs, and say so."""
    from .outputs import clean_leftovers

    for path in paths:
        for leftover in clean_leftovers(path.parent, path.name):
            err.print(f"Removed {escape(str(leftover))}, left by an interrupted run.", highlight=False)


def _clean_heal_leftovers(output: Path) -> None:
    from .heal import state_path

    _clean_leftovers(output, state_path(output))


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
    model: Annotated[str, typer.Argument(help="timm model name, e.g. seresnet50.")],
    recipe: RecipeOpt = None,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a model's SE blocks and, with --recipe, what the recipe would change. Writes nothing."""
    with _user_errors():
        from .recipe import load_recipe

        parsed = load_recipe(recipe) if recipe else None
        kwargs = _model_kwargs(features_only, out_indices, model_arg)
        from .report import plan_to_dict, render_plan, render_se_blocks, render_totals, se_blocks_to_dict
        from .surgery import inspect as inspect_model

        result = inspect_model(model, parsed, **kwargs)
        report = plan_to_dict(result.plan) if result.plan else _no_plan(model, result.params)
        report.update(result.macs)
        report["se_blocks"] = se_blocks_to_dict(result.se_blocks)
        if json_out:
            _print_json(report)
            return
        render_se_blocks(out, model, report["se_blocks"])
        if result.plan:
            render_plan(out, report)
        render_totals(out, report)


def _no_plan(model: str, params: int) -> dict[str, Any]:
    from .report import totals_to_dict

    return {**totals_to_dict(model, params, None), "edits": []}


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. seresnet50.")],
    recipe: RecipeOpt = None,
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", help="Where to write the patched .safetensors checkpoint."),
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(
            "--checkpoint",
            "-c",
            help="Source weights of MODEL: .safetensors, or a .pth/.pt/.bin state_dict (read with weights_only=True).",
        ),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option("--pretrained", help="Source weights: timm's pretrained weights (Hugging Face cache)."),
    ] = False,
    non_strict: Annotated[
        bool,
        typer.Option(
            "--non-strict", help="Load what fits of a checkpoint that does not fit, and report the rest."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan only; build nothing, write nothing.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for new ECA weights and the check input.")] = 0,
    timm_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--timm-dir",
            help="Also write a timm/Hugging Face folder (config.json + model.safetensors) that plain "
            "timm loads with create_model('local-dir:DIR', pretrained=True).",
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="New ECA kernels: default (PyTorch's init), fit-se (least-squares fit to the SE block "
            "each one replaces) or identity (inserted blocks start as the identity).",
        ),
    ] = "default",
    calib_data: Annotated[
        Optional[Path],
        typer.Option(
            "--calib-data",
            help="Folder of images (any depth) for --init fit-se/identity; without it, seeded noise.",
        ),
    ] = None,
    calib_size: Annotated[int, typer.Option(help="How many calibration inputs to use.")] = 64,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert MODEL as the recipe says, check a forward pass, and save a safetensors checkpoint."""
    with _user_errors():
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
        from .recipe import load_recipe

        parsed = load_recipe(recipe)
        kwargs = _model_kwargs(features_only, out_indices, model_arg)
        from .checkpoint import check_output, save_patched
        from .native import NOT_NATIVE, check_timm_dir
        from .report import plan_to_dict, render_init, render_plan, render_totals
        from .surgery import convert as convert_model

        if output is not None and not dry_run:
            check_output(output, force)
            _clean_leftovers(output)
        if timm_dir is not None and not dry_run:
            check_timm_dir(timm_dir, force)
            _clean_leftovers(timm_dir)
        if not dry_run:  # after the checks of each output, whose reasons are more specific
            from .outputs import check_outputs_apart

            check_outputs_apart(
                {"output": output, "timm folder": timm_dir},
                {"checkpoint": checkpoint, "recipe": parsed.source, "calibration data": calib_data},
            )

        def check_space(plan) -> None:  # a lower bound: 2 bytes a parameter
            if output is not None and not dry_run:
                check_output(output, force, size=2 * plan.params_after)
            if timm_dir is not None and not dry_run:
                check_timm_dir(timm_dir, force, size=2 * plan.params_after)

        result = convert_model(
            model,
            parsed,
            checkpoint=checkpoint,
            pretrained=pretrained,
            strict=not non_strict,
            dry_run=dry_run,
            seed=seed,
            init=init,
            calib_data=calib_data,
            calib_size=calib_size,
            require_native=timm_dir is not None,
            on_plan=check_space,
            **kwargs,
        )
        if timm_dir is not None and result.native is None:
            raise SurgeryError(NOT_NATIVE.format(model=model))
        if checkpoint is None and not pretrained and not dry_run:
            err.print(
                "Note: no --checkpoint or --pretrained; the source weights are timm's random initialisation."
            )
        for label, keys in (
            ("left at initialisation (missing)", result.loaded["missing"]),
            ("ignored (unexpected or wrong shape)", result.loaded["ignored"]),
        ):
            if keys:
                err.print(
                    f"Warning: --non-strict: {len(keys)} weights {label}: {sample_keys(keys)}",
                    highlight=False,
                )
        report = plan_to_dict(result.plan)
        report.update(result.macs)
        report.update(
            source_weights=result.source,
            check=result.check,
            dry_run=dry_run,
            timm_native=result.native,
            init=result.init,
            dtype=result.dtype,
        )
        if non_strict:
            report["non_strict"] = result.loaded
        if not dry_run and output is not None:
            path = save_patched(
                result.model,
                output,
                result.plan,
                model_kwargs=result.model_kwargs,
                source=result.source,
                native=result.native,
                init=result.init,
                force=force,
            )
            report["output"] = str(path)
        if not dry_run and timm_dir is not None:
            from .native import save_timm_dir

            report["timm_dir"] = str(save_timm_dir(result.native, result.model.state_dict(), timm_dir, force))
        if json_out:
            _print_json(report)
            return
        render_plan(out, report)
        render_totals(out, report)
        render_init(out, result.init)
        if result.check:
            out.print(
                f"Forward check: output shape at {'x'.join(map(str, report.get('input_size', [])))} unchanged "
                f"({_shape(result.check['output_shape_at_default_size'])}); outputs on a "
                f"{_shape(result.check['input_shape'])} {report['dtype']} input are finite."
            )
        if report["dtype"] != "float32":
            out.print(
                f"The model keeps the checkpoint's dtype, {report['dtype']}: feed it inputs of that dtype "
                "(or call .float() on the loaded model)."
            )
        if result.native:
            kw = json.dumps(result.native["kwargs"])
            out.print(
                f"timm builds this itself: timm.create_model({result.native['model']!r}, **{kw})",
                highlight=False,
            )
        if dry_run:
            out.print("Dry run: nothing was written.")
        for key in ("output", "timm_dir"):
            if key in report:
                out.print(f"Wrote [bold]{escape(report[key])}[/]")


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A checkpoint written by `eca-surgery convert`.")],
    json_out: JsonOpt = False,
) -> None:
    """Rebuild a patched model from its checkpoint alone, load it strictly, and run it."""
    with _user_errors():
        from .report import plan_to_dict, render_plan, render_totals
        from .surgery import dtype_of
        from .surgery import verify as verify_checkpoint

        patched, check = verify_checkpoint(path)
        report = plan_to_dict(patched.plan)
        report.update(
            file=str(path),
            dtype=dtype_of(patched.model),
            check=check,
            versions={k: patched.metadata.get(f"{k}_version") for k in ("eca_surgery", "timm", "torch")},
        )
        if json_out:
            _print_json(report)
            return
        render_plan(out, report)
        render_totals(out, report)
        out.print(
            f"Verified {escape(str(path))}: weights load strictly into {report['model']} patched by its recipe; "
            f"forward {_shape(check['input_shape'])} -> {_shape(check['output_shape'])}, finite; "
            f"dtype: {report['dtype']}."
        )


def _shape(shape: list) -> str:
    if shape and isinstance(shape[0], list):
        return ", ".join(_shape(s) for s in shape)
    return str(tuple(shape))


@app.command("recipes")
def list_recipes(json_out: JsonOpt = False) -> None:
    """List the bundled recipes, usable by name with --recipe."""
    from rich.table import Table

    with _user_errors():
        from .recipe import bundled_recipes, load_recipe

        rows = [
            {"name": name, "description": load_recipe(path).description or "", "path": str(path)}
            for name, path in sorted(bundled_recipes().items())
        ]
        if json_out:
            _print_json({"recipes": rows})
            return
        table = Table("name", "description", title="Bundled recipes", title_justify="left")
        for row in rows:
            table.add_row(row["name"], row["description"])
        out.print(table)


@app.command()
def scan(
    pattern: Annotated[
        str, typer.Argument(help="timm model-name pattern, e.g. 'seres*' (default: all).")
    ] = "*",
    sort: Annotated[
        str, typer.Option("--sort", help="Order rows by: saving, saving-pct, params or name.")
    ] = "saving",
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count GMACs before and after.")] = True,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Show only the first N rows.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Scan timm's models (on the meta device) for SE blocks and what SE-to-ECA would save."""
    with _user_errors():
        from .scan import SORT_KEYS

        if sort not in SORT_KEYS:
            raise SurgeryError(f"--sort {sort!r} is not one of: {', '.join(SORT_KEYS)}.")
        import timm
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .report import render_scan
        from .scan import scan as scan_models

        names = timm.list_models(pattern)
        if not names:
            raise SurgeryError(
                f"No timm model matches {pattern!r}; try a wider pattern such as '*{pattern.strip('*')}*'."
            )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("scanning", total=len(names))

            def advance(name: str) -> None:
                progress.update(task, advance=1, description=f"scanning {name}")

            result = scan_models(names, flops=flops, on_model=advance)
        result.rows.sort(key=SORT_KEYS[sort])
        report = result.to_dict(limit)  # counts of every model scanned; rows cut to --limit
        if json_out:
            _print_json(report)
            return
        render_scan(out, report)


@app.command()
def heal(
    patched: Annotated[Path, typer.Argument(help="A checkpoint written by `eca-surgery convert`.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Folder of training images, at any depth; labels unused.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the healed checkpoint.")],
    teacher: Annotated[
        Optional[str],
        typer.Option(help="timm name of the original model (default: the one PATCHED was converted from)."),
    ] = None,
    teacher_checkpoint: Annotated[
        Optional[Path],
        typer.Option(
            "--teacher-checkpoint", help="The teacher's weights (default: timm's pretrained weights, cached)."
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Optimizer steps in all (a resumed run counts earlier ones).")
    ] = 200,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 1e-3,
    train: Annotated[
        str,
        typer.Option(help="What trains: eca (new kernels), norm (those and norm layers) or all."),
    ] = "norm",
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).")] = 32,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL loss.")] = 1.0,
    feature_weight: Annotated[
        float, typer.Option(help="Weight of an MSE loss on forward_features maps (0: logits only).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the image order.")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run that wrote OUTPUT, up to --steps.")
    ] = False,
    save_every: Annotated[int, typer.Option(help="Also write OUTPUT every N steps (0: at the end).")] = 0,
    device: Annotated[
        Optional[str], typer.Option(help="Device, e.g. cpu or cuda:1 (default: the GPU if any).")
    ] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Distil the original model into a patched one on unlabelled images, training only what --train says."""
    with _user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .heal import HealSettings
        from .heal import heal as heal_model

        settings = HealSettings(steps, lr, train, batch_size, temperature, feature_weight, 0.0, seed)
        output = _file_path(output)
        _clean_heal_leftovers(output)
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
        if result.rank != 0:
            return
        report = {
            "output": str(output),
            "steps": result.step,
            "resumed_from_step": result.start_step,
            "loss_first": result.losses[0],
            "loss_last": result.losses[-1],
            "images_per_s": result.images_per_s,
            "settings": result.settings.__dict__,
        }
        if json_out:
            _print_json(report)
            return
        out.print(
            f"Healed steps {result.start_step + 1}-{result.step} ({train}): distillation loss "
            f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.images_per_s:.1f} img/s"
        )
        out.print(f"Wrote [bold]{escape(str(output))}[/]")


recipe_app = typer.Typer(
    help="Check recipes and print the recipe format's JSON Schema.", no_args_is_help=True
)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("check")
def recipe_check(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or bundled recipe name.")],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Also resolve it against this timm model.")
    ] = None,
    features_only: FeaturesOpt = False,
    out_indices: OutIndicesOpt = None,
    model_arg: ModelArgOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate a recipe; with --model, show the plan it gives (built on the meta device, no weights)."""
    with _user_errors():
        from .recipe import load_recipe

        parsed = load_recipe(recipe)
        report: dict[str, Any] = {"recipe": parsed.to_dict(), "valid": True}
        if model is not None:
            from .report import plan_to_dict
            from .surgery import inspect as inspect_model

            plan = inspect_model(model, parsed, **_model_kwargs(features_only, out_indices, model_arg)).plan
            report["plan"] = plan_to_dict(plan)
        if json_out:
            _print_json(report)
            return
        out.print(f"{escape(parsed.source)}: valid recipe, {len(parsed.rules)} rule(s).", highlight=False)
        for i, rule in enumerate(parsed.rules):
            where = (
                f" {rule.where}" if rule.action == "insert" and rule.select.placement != "in-blocks" else ""
            )
            out.print(
                f"  rule {i + 1}: {rule.action}{where} {escape(rule.select.describe())}", highlight=False
            )
        if model is not None:
            from .report import render_plan, render_totals

            render_plan(out, report["plan"])
            render_totals(out, report["plan"])


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
