"""Scan timm's (or torchvision's) model zoo: which models have SE blocks, and what SE-to-ECA would save.

Every model is built on the meta device (no weights allocated), so a scan of the
whole zoo costs only the time to construct each model and count its MACs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .choices import ScanSource, Sort, choice
from .errors import SurgeryError
from .recipe import EcaOptions, Recipe, Rule, Selector

SE_TO_ECA = Recipe(rules=(Rule("replace", Selector(se=True), EcaOptions()),), name="se-to-eca")


@dataclass
class ScanRow:
    """One model with SE blocks and what replacing them with ECA gives."""

    model: str
    se_blocks: dict[str, int]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    unknown_se_like: list[str] = field(default_factory=list)
    macs_scope: str = ""  # the backbone counted where the model could not be counted whole

    @property
    def saving(self) -> int:
        return self.params_before - self.params_after

    @property
    def saving_pct(self) -> float:
        return 100.0 * self.saving / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving, "saving_pct": round(self.saving_pct, 4)}


@dataclass
class ScanResult:
    rows: list[ScanRow]
    failures: dict[str, str]
    without_se: int
    scanned: int

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        """The counts over every model scanned; ``models`` holds the first ``limit`` rows
        (all without a limit) and ``shown`` how many that is."""
        rows = self.rows[:limit] if limit is not None else self.rows
        return {
            "scanned": self.scanned,
            "with_se": len(self.rows),
            "without_se": self.without_se,
            "failed": len(self.failures),
            "shown": len(rows),
            "models": [r.to_dict() for r in rows],
            "failures": self.failures,
        }


def scan_model(name: str, flops: bool = True) -> ScanRow | None:
    """Plan SE-to-ECA for one model on the meta device; None if it has no SE blocks."""
    from .detect import find_se_blocks, find_unknown_se_like
    from .models import create_model
    from .plan import make_plan
    from .surgery import macs_before_after

    model = create_model(name, meta=True)
    blocks = find_se_blocks(model)
    unknown = find_unknown_se_like(model)
    if not blocks:
        return ScanRow(name, {}, 0, 0, None, None, unknown) if unknown else None
    plan = make_plan(model, SE_TO_ECA, name)
    macs = macs_before_after(model, plan) if flops else {"macs_before": None, "macs_after": None}
    counts = Counter(b.class_name.rsplit(".", 1)[-1] for b in blocks)
    return ScanRow(
        name,
        dict(counts),
        plan.params_before,
        plan.params_after,
        macs["macs_before"],
        macs["macs_after"],
        unknown,
        macs.get("macs_scope", ""),
    )


def scan(
    names: Iterable[str],
    flops: bool = True,
    on_model: Callable[[str], None] | None = None,
) -> ScanResult:
    """Scan ``names``; a model that fails to build or plan is recorded with its reason."""
    rows, failures, without, scanned = [], {}, 0, 0
    for name in names:
        scanned += 1
        if on_model is not None:
            on_model(name)
        try:
            row = scan_model(name, flops)
        except SurgeryError as exc:
            failures[name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the scan
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        if row is None:
            without += 1
        else:
            rows.append(row)
    return ScanResult(rows, failures, without, scanned)


SORT_KEYS: dict[Sort, Callable[[ScanRow], Any]] = {
    Sort.SAVING: lambda r: -r.saving,
    Sort.SAVING_PCT: lambda r: -r.saving_pct,
    Sort.PARAMS: lambda r: -r.params_before,
    Sort.NAME: lambda r: r.model,
}


def model_names(pattern: str = "*", source: ScanSource | str = ScanSource.TIMM) -> list[str]:
    """The models of ``source`` matching the fnmatch ``pattern``, as ``create_model`` takes
    them (torchvision's as ``torchvision:NAME``); a SurgeryError when none does."""
    source = choice(ScanSource, source, "source")
    if source is ScanSource.TORCHVISION:
        from fnmatch import fnmatchcase

        from .models import torchvision_names

        names = [f"torchvision:{n}" for n in sorted(torchvision_names()) if fnmatchcase(n, pattern)]
    else:
        import timm

        names = timm.list_models(pattern)
    if not names:
        raise SurgeryError(
            f"No {source.value} model matches {pattern!r}; try a wider pattern such as "
            f"'*{pattern.strip('*')}*'."
        )
    return names


def sort_rows(result: ScanResult, by: Sort | str = Sort.SAVING) -> ScanResult:
    """``result`` with its rows in the order ``by`` names (largest saving first, ...)."""
    result.rows.sort(key=SORT_KEYS[choice(Sort, by, "sort")])
    return result
