"""Scan timm's (or torchvision's) model zoo: which models have SE blocks, and what SE-to-ECA would save.

Every model is built on the meta device (no weights allocated), so a scan of the
whole zoo costs only the time to construct each model and count its MACs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .choices import MAX_JOBS, ScanSource, Sort, choice
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
    notes: list[str] = field(default_factory=list)  # about the cache; not part of the report

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


_ROW_TYPES: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: isinstance(v, str),
    # class names: identifiers (so a tampered cache cannot slip markup into the table)
    "se_blocks": lambda v: (
        isinstance(v, dict) and all(k.isidentifier() and type(n) is int for k, n in v.items())
    ),
    "params_before": lambda v: type(v) is int,
    "params_after": lambda v: type(v) is int,
    "macs_before": lambda v: v is None or type(v) is int,
    "macs_after": lambda v: v is None or type(v) is int,
    "unknown_se_like": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
    "macs_scope": lambda v: isinstance(v, str),
}


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    if outcome.failure is not None:
        return {"failure": outcome.failure}
    return {"row": asdict(outcome.row)} if outcome.row is not None else {}


def outcome_from_json(name: str, value: Any) -> Outcome | None:
    """The Outcome a cache entry holds, or None where the entry is not one this code wrote
    for ``name`` (the scan then rebuilds it)."""
    if value == {}:
        return Outcome()
    if isinstance(value, dict) and list(value) == ["failure"] and isinstance(value["failure"], str):
        return Outcome(failure=value["failure"])
    row = value.get("row") if isinstance(value, dict) and list(value) == ["row"] else None
    if not isinstance(row, dict) or set(row) != set(_ROW_TYPES) or row["model"] != name:
        return None
    if not all(valid(row[key]) for key, valid in _ROW_TYPES.items()):
        return None
    return Outcome(ScanRow(**row))


class OutcomeCache:
    """Each model's scan outcome, kept in one cache file per source (see ``cache``)."""

    def __init__(self, flops: bool, refresh: bool = False) -> None:
        self.flops, self.refresh = flops, refresh
        self.files: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        from .cache import CacheFile, cache_dir, cache_key, source_of

        source = source_of(name)
        if source not in self.files:
            key = cache_key(source, "scan", self.flops)
            self.files[source] = CacheFile.open(cache_dir(), key, self.refresh)
        return self.files[source]

    def lookup(self, names: list[str]) -> dict[str, Outcome]:
        found = {}
        for name in names:
            outcome = outcome_from_json(name, self._file(name).entries.get(name))
            if outcome is not None:
                found[name] = outcome
        return found

    def put(self, name: str, outcome: Outcome) -> None:
        if outcome.lasting:
            self._file(name).put(name, outcome_to_json(outcome))
        else:  # a crash or a hang may not happen again: scan it again next time
            self._file(name).drop(name)

    def save(self) -> list[str]:
        """Write what was added; the notes (at most one) where the cache could not be written."""
        notes = [note for file in self.files.values() if (note := file.save()) is not None]
        return notes[:1]


DEFAULT_TIMEOUT = 120.0
# what a worker imports once, so that each model it builds costs only the build
WORKER_PRELOAD = ["timm", "eca_surgery.surgery", "eca_surgery.detect", "eca_surgery.plan", "eca_surgery.scan"]


@dataclass(frozen=True)
class Outcome:
    """What scanning one model gave: its row, or None without SE blocks, or the failure's
    reason; ``lasting`` is False for a failure the machine may not repeat (a crash, a hang)."""

    row: ScanRow | None = None
    failure: str | None = None
    lasting: bool = True


@dataclass(frozen=True)
class ScanProgress:
    """How far a scan is: models ``done`` of ``total``, and those being built now."""

    done: int
    total: int
    building: tuple[str, ...]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def scan_outcome(
    name: str, flops: bool = True, scan_one: Callable[[str, bool], ScanRow | None] = scan_model
) -> Outcome:
    """``scan_one(name, flops)`` as an Outcome: an exception is the model's failure, with its reason."""
    try:
        return Outcome(scan_one(name, flops))
    except SurgeryError as exc:
        return Outcome(failure=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken model must not stop the scan
        return Outcome(failure=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _in_process(
    names: list[str], task: Callable[[str], Outcome], on_start: Callable[[str], None]
) -> Iterator[tuple[str, Outcome]]:
    for name in names:
        on_start(name)
        yield name, task(name)


def _outcomes(
    names: list[str],
    task: Callable[[str], Outcome],
    jobs: int,
    timeout: float,
    on_start: Callable[[str], None],
) -> Iterator[tuple[str, Outcome]]:
    """``(name, outcome)`` for each of ``names``: in this process with one job (or one model),
    else over ``jobs`` worker processes, where a crash or a hang is the model's failure."""
    if jobs <= 1 or len(names) < 2:
        yield from _in_process(names, task, on_start)
        return
    from .workers import Crashed, WorkerPool

    for name, result in WorkerPool(task, jobs, timeout, WORKER_PRELOAD).run(names, on_start):
        if isinstance(result, Crashed):
            result = Outcome(failure=f"the model crashed or hung the scan: {result.reason}", lasting=False)
        yield name, result


class _Tracker:
    """Counts models done and those being built, and tells ``on_progress`` and ``on_model``."""

    def __init__(self, total: int, on_progress: Callable[[ScanProgress], None] | None, on_model: Any) -> None:
        self.total, self.done, self.building = total, 0, []
        self.on_progress, self.on_model = on_progress, on_model

    def _tell(self) -> None:
        if self.on_progress is not None:
            self.on_progress(ScanProgress(self.done, self.total, tuple(self.building)))

    def started(self, name: str) -> None:
        self.building.append(name)
        if self.on_model is not None:
            self.on_model(name)
        self._tell()

    def finished(self, name: str | None = None, count: int = 1) -> None:
        if name in self.building:
            self.building.remove(name)
        self.done += count
        self._tell()


def _assemble(names: list[str], outcomes: dict[str, Outcome], notes: list[str]) -> ScanResult:
    """The ScanResult of ``names`` in their order (so any ``jobs`` gives the same result)."""
    rows, failures, without = [], {}, 0
    for name in names:
        outcome = outcomes[name]
        if outcome.failure is not None:
            failures[name] = outcome.failure
        elif outcome.row is None:
            without += 1
        else:
            rows.append(outcome.row)
    return ScanResult(rows, failures, without, len(names), notes)


def _check_pool(jobs: int, timeout: float) -> None:
    """A SurgeryError for a ``jobs`` or ``timeout`` no pool can run with."""
    import math

    if type(jobs) is not int or not 1 <= jobs <= MAX_JOBS:
        raise SurgeryError(
            f"`jobs` must be a whole number from 1 to {MAX_JOBS}, not {jobs!r}; pass the worker "
            "processes to build models in (the cores available is a good choice)."
        )
    if not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
        raise SurgeryError(
            f"`timeout` must be a positive number of seconds, not {timeout!r}; pass how long one "
            f"model may take in a worker (default {DEFAULT_TIMEOUT:g})."
        )


def scan(
    names: Iterable[str],
    flops: bool = True,
    on_model: Callable[[str], None] | None = None,
    *,
    jobs: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    cache: bool = False,
    refresh: bool = False,
    on_progress: Callable[[ScanProgress], None] | None = None,
    scan_one: Callable[[str, bool], ScanRow | None] = scan_model,
) -> ScanResult:
    """Scan ``names``; a model that fails to build or plan is recorded with its reason.

    With ``jobs`` > 1 the models are spread over that many worker processes, where a model
    that crashes its worker or runs past ``timeout`` seconds is a failure too. With ``cache``
    each model's outcome is kept in the user's cache folder (``cache.cache_dir``) and read
    back by later scans (``refresh`` rebuilds it). ``on_model`` is told each model as it
    starts, ``on_progress`` how far the scan is. ``scan_one`` (a picklable function) scans
    one model; tests pass one that crashes."""
    from functools import partial

    _check_pool(jobs, timeout)
    names = list(names)
    store = OutcomeCache(flops, refresh) if cache else None
    outcomes = store.lookup(names) if store is not None else {}
    todo = [n for n in dict.fromkeys(names) if n not in outcomes]
    tracker = _Tracker(len(names), on_progress, on_model)
    tracker.finished(count=len(names) - len(todo))
    task = partial(scan_outcome, flops=flops, scan_one=scan_one)
    try:
        for name, outcome in _outcomes(todo, task, jobs, timeout, tracker.started):
            outcomes[name] = outcome
            tracker.finished(name)
            if store is not None:
                store.put(name, outcome)
    finally:
        notes = store.save() if store is not None else []
    return _assemble(names, outcomes, notes)


SORT_KEYS: dict[Sort, Callable[[ScanRow], Any]] = {
    Sort.SAVING: lambda r: -r.saving,
    Sort.SAVING_PCT: lambda r: -r.saving_pct,
    Sort.PARAMS: lambda r: -r.params_before,
    Sort.NAME: lambda r: r.model,
}


def _list_names(pattern: str, source: ScanSource) -> list[str]:
    if source is ScanSource.TORCHVISION:
        from fnmatch import fnmatchcase

        from .models import torchvision_names

        return [f"torchvision:{n}" for n in sorted(torchvision_names()) if fnmatchcase(n, pattern)]
    import timm

    return timm.list_models(pattern)


_NAME = re.compile(r"[\w.:-]+")  # what a model name is made of (timm's, torchvision:NAME)


def _cached_names(pattern: str, source: ScanSource, refresh: bool, warm: bool) -> list[str]:
    """The model list of ``pattern``, kept in the cache (so that a cached scan imports
    neither timm nor torch); listed and kept where missing, after starting the workers'
    fork server with ``warm`` (its imports then overlap timm's import here)."""
    from .cache import CacheFile, cache_dir, cache_key

    file = CacheFile.open(cache_dir(), cache_key(source.value, "names"), refresh)
    names = file.entries.get(pattern)
    if isinstance(names, list) and names and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
        return names
    if warm:
        from .workers import warm_up

        warm_up(WORKER_PRELOAD)
    names = _list_names(pattern, source)
    if names:
        file.put(pattern, names)
        file.save()  # a cache that cannot be written is noted by the scan's own save
    return names


def model_names(
    pattern: str = "*",
    source: ScanSource | str = ScanSource.TIMM,
    cache: bool = False,
    refresh: bool = False,
    warm: bool = False,
) -> list[str]:
    """The models of ``source`` matching the fnmatch ``pattern``, as ``create_model`` takes
    them (torchvision's as ``torchvision:NAME``); a SurgeryError when none does. With
    ``cache`` the list is kept in the user's cache folder, keyed by the versions; ``warm``
    (for a scan with ``jobs`` > 1 to follow) starts the workers early where it is not."""
    source = choice(ScanSource, source, "source")
    names = _cached_names(pattern, source, refresh, warm) if cache else _list_names(pattern, source)
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
