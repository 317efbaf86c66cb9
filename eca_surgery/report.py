"""Reports: plans, SE blocks and parameter totals as JSON-ready dicts and as rich tables.

The dict functions are the single source of what is reported; the rich renderers
only lay those dicts out, so ``--json`` and the tables always agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from rich.console import Console

    from .detect import SEBlock
    from .plan import Plan


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
        console.print(
            f"GMACs at {'x'.join(map(str, report['input_size']))}: {report['macs_before'] / 1e9:.3f} -> "
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
        for column in ("SE block", "channels", "k", "rel. error", "R²", "target"):
            table.add_column(column, justify="left" if column in ("SE block", "target") else "right")
        for b in init["blocks"]:
            table.add_row(
                b["path"], str(b["channels"]), str(b["kernel_size"]), f"{b['rel_error']:.4f}",
                f"{b['r2']:.4f}", b["target"],
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
        _gmacs(r["macs_before"]),
        _gmacs(r["macs_after"]),
    ]


def _scan_table(rows: list[list[str]], drop: int, model_width: int = 30):
    """The scan table without the columns of drop order 1..``drop``, and its width."""
    from rich.table import Table

    keep = [i for i, (_, _, order) in enumerate(SCAN_COLUMNS) if not (0 < order <= drop)]
    table = Table(title="SE blocks in timm models and SE-to-ECA savings", title_justify="left")
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
