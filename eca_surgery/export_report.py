"""The ``export`` command's report: ``ExportResult.to_dict()`` laid out as rich tables.

The dict (``--json``) is the single source of what is reported; these renderers only lay it
out, so the JSON and the tables agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console


def dims_text(dynamic: list[dict[str, Any]]) -> str:
    """The dynamic dimensions and their ranges, e.g. ``batch 2..inf, height 2..inf``."""
    if not dynamic:
        return "none (static shape)"
    return ", ".join(f"{d['name']} {d['min']}..{'inf' if d['max'] is None else d['max']}" for d in dynamic)


def render_format(console: Console, fmt: dict[str, Any]) -> None:
    """One exported file: how it was made, then a parity row per input."""
    opset = f", opset {fmt['opset']}" if fmt["opset"] is not None else ""
    console.print(
        f"[bold]{escape(fmt['format'])}[/] ({escape(fmt['exporter'])} exporter{opset}, "
        f"{fmt['seconds']:.1f} s); dynamic: {escape(dims_text(fmt['dynamic']))}",
        highlight=False,
    )
    table = Table(title=f"Parity with PyTorch (tolerance {fmt['atol']:g} absolute)")
    for column in ("input", "max abs", "max rel", "ok"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for row in fmt["rows"]:
        table.add_row(
            "x".join(map(str, row["shape"])),
            f"{row['max_abs']:.3g}",
            f"{row['max_rel']:.3g}",
            "[green]yes[/]" if row["ok"] else "[bold red]NO[/]",
        )
    console.print(table)
    for note in fmt.get("notes", []):
        console.print(escape(note), highlight=False)


def render_export(console: Console, report: dict[str, Any]) -> None:
    """Every exported file of an ``ExportResult.to_dict()`` and where it was written."""
    traced = f", traced at {'x'.join(map(str, report['input_size']))}" if report["input_size"] else ""
    console.print(f"{escape(report['model'])} from {escape(report['checkpoint'])}{traced}")
    for fmt in report["formats"]:
        render_format(console, fmt)
        console.print(f"Wrote [bold]{escape(fmt['path'])}[/]")
    if report.get("hub_dir"):
        console.print(
            f"Wrote [bold]{escape(report['hub_dir'])}[/] (model.safetensors and its model card, README.md)"
        )
