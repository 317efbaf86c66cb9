"""Reports: what each command found or did, as JSON-ready dicts and as rich output.

The dict functions (``*_report``, ``*_to_dict``) are the single source of what is
reported; the rich renderers only lay those dicts out, so ``--json`` and the tables
always agree. Notes meant for the user (``*_notes``) name Python parameters in
backticks, as library messages do (see ``errors.with_flags``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from .errors import sample_keys

if TYPE_CHECKING:
    from rich.console import Console

    from .checkpoint import Patched
    from .detect import SEBlock
    from .healing import HealResult
    from .plan import Plan
    from .recipe import Recipe
    from .scan import ScanResult
    from .surgery import Conversion, Inspection


def se_blocks_to_dict(blocks: list[SEBlock]) -> list[dict[str, Any]]:
    from .plan import count_params

    return [
        {
            "path": b.path,
            "class": b.class_name,
            "channels": b.channels,
            "gate": b.gate.__name__ if b.gate else None,
            "params": count_params(b.module),
        }
        for b in blocks
    ]


def totals_to_dict(model: str, params_before: int, plan: Plan | None) -> dict[str, Any]:
    """The parameter totals, with or without a plan (without one nothing changes)."""
    after = plan.params_after if plan else params_before
    return {
        "model": model,
        "params_before": params_before,
        "params_after": after,
        "params_delta": after - params_before,
        "params_delta_pct": round(100.0 * (after - params_before) / params_before, 4)
        if params_before
        else 0.0,
        "params_removed": plan.params_removed if plan else 0,
        "params_added": plan.params_added if plan else 0,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready object: totals, the recipe, matches per rule, every edit."""
    return {
        **totals_to_dict(plan.model, plan.params_before, plan),
        "recipe": {"source": plan.recipe.source, "name": plan.recipe.name},
        "rule_matches": list(plan.rule_matches),
        "edits": [e.to_dict() for e in plan.edits],
    }


def _short(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


def describe_edit(e: dict[str, Any]) -> str:
    """What an edit does to the module it acts on, in a few words."""
    old = _short(e["old_class"])
    if e["position"] == "in-place":
        return f"replaces {old}"
    if e["position"] == "slot":
        return f"fills empty slot ({old})"
    return f"{e['position']} {e['path'] or 'model'} ({old})"


def _signed(n: int) -> str:
    return f"{n:+,}"


def render_se_blocks(console: Console, model: str, blocks: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not blocks:
        console.print(f"[bold]{model}[/] has no SE blocks.")
        return
    table = Table(title=f"SE blocks of {model} ({len(blocks)})", title_justify="left")
    table.add_column("path")
    table.add_column("class")
    table.add_column("channels", justify="right")
    table.add_column("gate")
    table.add_column("params", justify="right")
    for b in blocks:
        table.add_row(b["path"], _short(b["class"]), str(b["channels"]), b["gate"] or "-", f"{b['params']:,}")
    console.print(table)


def render_unknown_se(console: Console, unknown: list[str]) -> None:
    """The modules that look like SE blocks but are not known, with how to register their class."""
    from rich.markup import escape

    from .detect import register_call

    if not unknown:
        return
    console.print(f"{len(unknown)} module(s) look like SE blocks but their class is not known (left alone):")
    for entry in unknown[:10]:
        console.print(f"  {escape(entry)}")
    if len(unknown) > 10:
        console.print(f"  ... ({len(unknown) - 10} more)")
    cls = unknown[0].rsplit("(", 1)[-1].rstrip(")").rsplit(".", 1)[-1]
    console.print(
        "To convert them, register their class once (in Python), e.g. "
        f"{escape(register_call(cls))}: `channels` names the squeeze layer, `gate` the gate module."
    )


def render_plan(console: Console, report: dict[str, Any]) -> None:
    """Print the edits table of a ``plan_to_dict`` report."""
    from rich.table import Table

    recipe = report["recipe"]["name"] or report["recipe"]["source"]
    matches = ", ".join(f"rule {i + 1}: {n}" for i, n in enumerate(report["rule_matches"]))
    table = Table(
        title=f"Plan for {report['model']} with {recipe} ({matches} matched)",
        title_justify="left",
    )
    table.add_column("ECA at", no_wrap=True)
    table.add_column("edit")
    table.add_column("channels", justify="right")
    table.add_column("k", justify="right")
    table.add_column("params", justify="right")
    table.add_column("new params", justify="right")
    for e in report["edits"]:
        table.add_row(
            e["eca_path"],
            describe_edit(e),
            str(e["channels"]),
            str(e["kernel_size"]),
            f"{e['params_before']:,}",
            f"{e['params_after']:,}",
        )
    console.print(table)


def render_totals(console: Console, report: dict[str, Any]) -> None:
    """Print parameter totals: before, after, delta and percent, removed vs added."""
    console.print(
        f"Parameters: {report['params_before']:,} -> {report['params_after']:,} "
        f"({_signed(report['params_delta'])}, {report['params_delta_pct']:+.2f}%)"
    )
    if report.get("macs_before") is not None and report.get("macs_after") is not None:
        scope = report.get("macs_scope")
        of = f" of the backbone {scope} (the whole model cannot be counted)" if scope else ""
        console.print(
            f"GMACs{of} at {'x'.join(map(str, report['input_size']))}: {report['macs_before'] / 1e9:.3f} -> "
            f"{report['macs_after'] / 1e9:.3f} (multiply-adds of convs and matmuls; FLOPs = 2 x MACs)"
        )
    elif report.get("macs_error"):
        console.print(f"GMACs: not counted; {escape(report['macs_error'])}", highlight=False)
    if report["params_removed"] or report["params_added"]:
        console.print(
            f"Parameters removed (replaced modules): {report['params_removed']:,}; "
            f"ECA parameters added: {report['params_added']:,}"
        )


def render_init(console: Console, init: dict[str, Any]) -> None:
    """Print how the new ECA kernels were started: per-block fits and output fidelity."""
    from rich.table import Table

    if init["method"] == "default":
        return
    if init.get("blocks"):
        table = Table(title="fit-se: each ECA kernel fitted to its SE block", title_justify="left")
        for column in ("SE block", "channels", "k", "rel. error", "R²", "target", "scale R²", "fold"):
            table.add_column(column, justify="left" if column in ("SE block", "target", "fold") else "right")
        for b in init["blocks"]:
            table.add_row(
                b["path"], str(b["channels"]), str(b["kernel_size"]), f"{b['rel_error']:.4f}",
                f"{b['r2']:.4f}", b["target"], _scale_r2(b), _fold(b),
            )  # fmt: skip
        console.print(table)
    console.print(f"Calibration: {escape(init['calibration'])}")
    table = Table(
        title="Outputs of the converted model vs the original's on the calibration inputs",
        title_justify="left",
    )
    for column in ("init", "mean cosine", "max |diff|", "top-1 agreement"):
        table.add_column(column, justify="left" if column == "init" else "right")
    rows = [("default", init.get("fidelity_default")), (init["method"], init["fidelity"])]
    for name, f in rows:
        if f is not None:
            agree = f"{f['top1_agreement']:.1%}" if "top1_agreement" in f else "-"
            table.add_row(name, f"{f['cosine']:.4f}", f"{f['max_abs_diff']:.3g}", agree)
    console.print(table)


def _scale_r2(block: dict[str, Any]) -> str:
    """The applied-scale R² of a fit-se block, and the plain kernel's where a fold changed it."""
    if block.get("scale_r2") is None:
        return "-"
    if block.get("fold") is None:
        return f"{block['scale_r2']:.4f}"
    return f"{block['scale_r2']:.4f} (unfolded {block['scale_r2_unfolded']:.4f})"


def _fold(block: dict[str, Any]) -> str:
    """Where a fit-se block's factor went, or why it stayed unfolded."""
    if block.get("fold") is not None:
        return f"{block['fold']['kind']}: {escape(block['fold']['path'])}"
    return f"none: {escape(block['fold_reason'])}" if block.get("fold_reason") else "-"


def _gmacs(macs: int | None) -> str:
    return "-" if macs is None else f"{macs / 1e9:.3f}"


# scan columns: header, justification, and the order in which they are dropped when the
# console is too narrow for all (0: never); numbers are never wrapped or cut
SCAN_COLUMNS = (
    ("model", "left", 0),
    ("SE blocks", "left", 3),
    ("params (M)", "right", 0),
    ("after (M)", "right", 1),
    ("saving (M)", "right", 0),
    ("%", "right", 0),
    ("GMACs", "right", 0),
    ("after", "right", 2),
)


def _scan_cells(r: dict[str, Any]) -> list[str]:
    blocks = ", ".join(f"{c}x{n}" for n, c in r["se_blocks"].items()) or "-"
    if r["unknown_se_like"]:
        blocks += f" (+{len(r['unknown_se_like'])} unknown SE-like)"
    return [
        r["model"],
        blocks,
        f"{r['params_before'] / 1e6:.2f}",
        f"{r['params_after'] / 1e6:.2f}",
        f"{r['saving'] / 1e6:.3f}",
        f"{r['saving_pct']:.1f}",
        _gmacs(r["macs_before"]) + (" (backbone)" if r.get("macs_scope") else ""),
        _gmacs(r["macs_after"]),
    ]


def _scan_table(rows: list[list[str]], drop: int, model_width: int = 30):
    """The scan table without the columns of drop order 1..``drop``, and its width."""
    from rich.table import Table

    keep = [i for i, (_, _, order) in enumerate(SCAN_COLUMNS) if not (0 < order <= drop)]
    table = Table(title="SE blocks and SE-to-ECA savings", title_justify="left")
    total = len(keep) + 1  # the borders
    for i in keep:
        header, justify, _ = SCAN_COLUMNS[i]
        width = max([len(header)] + [len(r[i]) for r in rows])
        if justify == "right":  # a number: never wrapped, never cut
            table.add_column(header, justify="right", no_wrap=True, min_width=width)
        else:  # text folds (is never cut) but stays readable: the model name whole if it can be
            width = min(model_width if i == 0 else 14, width)
            table.add_column(header, overflow="fold", min_width=width)
        total += width + 2  # the padding
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table, total


def render_scan(console: Console, report: dict[str, Any], limit: int | None = None) -> None:
    """Print a scan: one row per model with SE blocks shown, then failures and a summary of
    every model scanned. On a narrow console the less important columns are dropped
    rather than cutting numbers."""
    shown = report["models"][:limit] if limit else report["models"]
    rows = [_scan_cells(r) for r in shown]
    drops = max(order for _, _, order in SCAN_COLUMNS)
    for drop, model_width in [(d, 30) for d in range(drops + 1)] + [(drops, 10)]:
        table, width = _scan_table(rows, drop, model_width)
        if width <= console.width:
            break
    console.print(table)
    if drop:
        left = [h for h, _, order in SCAN_COLUMNS if 0 < order <= drop]
        console.print(
            f"(Columns left out to fit {console.width} characters: {', '.join(left)}; --json has them.)"
        )
    for name, reason in report["failures"].items():
        console.print(f"[yellow]failed[/] {escape(name)}: {escape(reason)}", highlight=False)
    listed = f" ({len(shown)} listed)" if len(shown) < report["with_se"] else ""
    console.print(
        f"Scanned {report['scanned']} models: {report['with_se']} with SE blocks{listed}, "
        f"{report['without_se']} without, {report['failed']} failed to build. "
        "GMACs: multiply-adds at the default input size (FLOPs = 2 x MACs)."
    )


def scan_report(result: ScanResult, limit: int | None = None) -> dict[str, Any]:
    """A scan's counts over every model scanned, with its rows cut to ``limit``."""
    return result.to_dict(limit)


def inspect_report(result: Inspection) -> dict[str, Any]:
    """What ``inspect`` found: the plan (or the totals alone), the MACs and the SE blocks."""
    if result.plan is not None:
        report = plan_to_dict(result.plan)
    else:
        report = {**totals_to_dict(result.model_name, result.params, None), "edits": []}
    report.update(result.macs)
    report["se_blocks"] = se_blocks_to_dict(result.se_blocks)
    report["unknown_se_like"] = list(result.unknown_se_like)
    return report


def render_inspect(console: Console, report: dict[str, Any]) -> None:
    render_se_blocks(console, report["model"], report["se_blocks"])
    render_unknown_se(console, report.get("unknown_se_like", []))
    if "recipe" in report:  # made with a recipe
        render_plan(console, report)
    render_totals(console, report)


def convert_report(result: Conversion) -> dict[str, Any]:
    """What ``convert`` did: the plan, MACs, source weights, checks, timm-native variant,
    init, dtype, what a non-strict load left out, and the files written."""
    report = plan_to_dict(result.plan)
    report.update(result.macs)
    report.update(
        source_weights=result.source,
        check=result.check,
        dry_run=result.dry_run,
        timm_native=result.native,
        init=result.init,
        dtype=result.dtype,
    )
    if not result.strict:
        report["non_strict"] = result.loaded
    for key, path in (("output", result.output), ("timm_dir", result.timm_dir)):
        if path is not None:
            report[key] = str(path)
    return report


def leftover_notes(paths: list[Path]) -> list[str]:
    """A line for each temporary of a killed run that was removed."""
    return [f"Removed {str(path)!r}, left by an interrupted run." for path in paths]


def convert_notes(result: Conversion) -> list[str]:
    """Notes on a conversion the user should see: random source weights, what a
    non-strict load left out."""
    from .surgery import RANDOM_SOURCE

    notes = []
    if result.source == RANDOM_SOURCE and not result.dry_run:
        notes.append(
            "Note: no `checkpoint` or `pretrained`; the source weights are timm's random initialisation."
        )
    for label, keys in (
        ("left at initialisation (missing)", result.loaded["missing"]),
        ("ignored (unexpected or wrong shape)", result.loaded["ignored"]),
    ):
        if keys:
            notes.append(f"Warning: `strict=False`: {len(keys)} weights {label}: {sample_keys(keys)}")
    return notes


def render_notes(console: Console, notes: list[str]) -> None:
    for note in notes:
        console.print(escape(note), highlight=False)


def shape_text(shape: list) -> str:
    """A shape as a tuple, ``(1, 1000)``; several (feature maps) separated by commas."""
    if shape and isinstance(shape[0], list):
        return ", ".join(shape_text(s) for s in shape)
    return str(tuple(shape))


def render_convert(console: Console, report: dict[str, Any]) -> None:
    """The plan, totals and init of a ``convert_report``, then what was checked and written."""
    render_plan(console, report)
    render_totals(console, report)
    render_init(console, report["init"])
    check = report["check"]
    if check:
        console.print(
            f"Forward check: output shape at {'x'.join(map(str, report.get('input_size', [])))} unchanged "
            f"({shape_text(check['output_shape_at_default_size'])}); outputs on a "
            f"{shape_text(check['input_shape'])} {report['dtype']} input are finite."
        )
    if report["dtype"] != "float32":
        console.print(
            f"The model is stored in its dtype, {report['dtype']}: feed it inputs of that dtype "
            "(or call .float() on the loaded model)."
        )
    native = report["timm_native"]
    if native:
        kw = json.dumps(native["kwargs"])
        console.print(
            f"timm builds this itself: timm.create_model({native['model']!r}, **{kw})", highlight=False
        )
    if report["dry_run"]:
        console.print("Dry run: nothing was written.")
    for key in ("output", "timm_dir"):
        if key in report:
            render_wrote(console, report[key])


def render_wrote(console: Console, path: str) -> None:
    console.print(f"Wrote [bold]{escape(path)}[/]")


def verify_report(patched: Patched, check: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What ``verify`` found: the plan the file was patched by, its dtype, the check, and
    the versions that wrote it."""
    from .models import dtype_of

    report = plan_to_dict(patched.plan)
    report.update(
        file=str(path),
        dtype=dtype_of(patched.model),
        dtype_recorded=patched.record.dtype,
        check=check,
        versions=asdict(patched.record.versions),
    )
    return report


def render_verify(console: Console, report: dict[str, Any]) -> None:
    render_plan(console, report)
    render_totals(console, report)
    check = report["check"]
    console.print(
        f"Verified {escape(report['file'])}: weights load strictly into {report['model']} patched by its "
        f"recipe; forward {shape_text(check['input_shape'])} -> {shape_text(check['output_shape'])}, "
        f"finite; dtype: {report['dtype']}."
    )


def heal_report(result: HealResult, output: str | Path) -> dict[str, Any]:
    """What ``heal`` did: the steps run, the first and last loss, the speed and the settings."""
    return {
        "output": str(output),
        "steps": result.step,
        "resumed_from_step": result.start_step,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "images_per_s": result.images_per_s,
        "settings": result.settings.to_dict(),
    }


def render_heal(console: Console, report: dict[str, Any]) -> None:
    console.print(
        f"Healed steps {report['resumed_from_step'] + 1}-{report['steps']} ({report['settings']['train']}): "
        f"distillation loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}, "
        f"{report['images_per_s']:.1f} img/s"
    )
    render_wrote(console, report["output"])


def recipes_report(recipes: dict[str, Path]) -> dict[str, Any]:
    """The bundled recipes (name -> file), each with its description."""
    from .recipe import load_recipe

    rows = [
        {"name": name, "description": load_recipe(path).description or "", "path": str(path)}
        for name, path in sorted(recipes.items())
    ]
    return {"recipes": rows}


def render_recipes(console: Console, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("name", "description", title="Bundled recipes", title_justify="left")
    for row in report["recipes"]:
        table.add_row(row["name"], row["description"])
    console.print(table)


def recipe_check_report(recipe: Recipe, plan: Plan | None = None) -> dict[str, Any]:
    """A valid recipe, and with a model the plan it gives."""
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "valid": True}
    if plan is not None:
        report["plan"] = plan_to_dict(plan)
    return report


def render_recipe_check(console: Console, report: dict[str, Any], recipe: Recipe) -> None:
    console.print(f"{escape(recipe.source)}: valid recipe, {len(recipe.rules)} rule(s).", highlight=False)
    for i, rule in enumerate(recipe.rules):
        where = f" {rule.where}" if rule.action == "insert" and rule.select.placement != "in-blocks" else ""
        console.print(
            f"  rule {i + 1}: {rule.action}{where} {escape(rule.select.describe())}", highlight=False
        )
    if "plan" in report:
        render_plan(console, report["plan"])
        render_totals(console, report["plan"])
