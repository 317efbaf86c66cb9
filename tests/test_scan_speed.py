"""scan over worker processes (same rows as in-process; crashes and hangs are failures) and
the scan cache (hits skip the work and give the same output; anything odd is rebuilt)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_ok
from scan_faults import faulty_scan

from eca_surgery import cache as cache_module
from eca_surgery.scan import scan, scan_model
from eca_surgery.workers import WorkerPool

MIXED = ["seresnet18", "resnet18", "torchvision:mobilenet_v3_small", "no_such_model_x"]


class Recorder:
    """``scan_model`` that records the names it is asked for (in-process scans only)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, flops: bool = True):
        self.names.append(name)
        return scan_model(name, flops)


def cache_files() -> list[Path]:
    return sorted(Path(os.environ["ECA_SURGERY_CACHE"]).glob("scan-*.json"))


def test_jobs_give_the_same_result_as_one_process():
    one = scan(MIXED, flops=True, jobs=1).to_dict()
    two = scan(MIXED, flops=True, jobs=2).to_dict()
    assert one == two
    assert one["with_se"] == 2 and one["without_se"] == 1 and list(one["failures"]) == ["no_such_model_x"]


def test_a_model_that_crashes_or_hangs_its_worker_is_a_failure_and_the_scan_goes_on():
    names = ["crash", "seresnet18", "hang", "segfault", "memory", "resnet18"]
    result = scan(names, flops=False, jobs=2, timeout=5, scan_one=faulty_scan, cache=True)
    assert [r.model for r in result.rows] == ["seresnet18"] and result.without_se == 1
    assert list(result.failures) == ["crash", "hang", "segfault", "memory"]
    assert "exited with code 3" in result.failures["crash"]
    assert "5 s timeout" in result.failures["hang"]
    assert "SIGSEGV" in result.failures["segfault"]
    assert result.failures["memory"] == "MemoryError: test"
    cached = json.loads(cache_files()[0].read_text())["entries"]
    assert set(cached) == {"seresnet18", "resnet18", "memory"}  # crashes and hangs are tried again


def test_stopping_a_pool_ends_its_workers():
    """What Ctrl-C does: the generator is closed, every worker is killed."""
    pool = WorkerPool(faulty_scan, 2, 60, [])
    results = pool.run(["resnet18", "hang", "hang"])
    next(results)
    processes = [w.process for w in pool.workers]
    results.close()
    assert processes and not any(p.is_alive() for p in processes)


def test_a_cache_hit_gives_the_same_output_without_scanning():
    first = scan(MIXED, cache=True, scan_one=Recorder()).to_dict()
    again = Recorder()
    assert scan(MIXED, cache=True, scan_one=again).to_dict() == first
    assert again.names == []
    assert [f.name.split("-")[1] for f in cache_files()] == ["timm", "torchvision"]


def test_refresh_scans_again_and_rewrites_the_cache():
    scan(MIXED, cache=True)
    before = [f.stat().st_mtime_ns for f in cache_files()]
    again = Recorder()
    scan(MIXED, cache=True, refresh=True, scan_one=again)
    assert again.names == MIXED and [f.stat().st_mtime_ns for f in cache_files()] != before


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "\x00\xff garbage",
        lambda text: "[1, 2, 3]",
        lambda text: '{"key": 1, "entries": []}',
        lambda text: re.sub(r'"params_before":\d+', '"params_before":"x"', text),  # wrong types
        lambda text: text.replace('{"SEModule":', '{"SEModule":true,"x":'),
        lambda text: text.replace('"model":"seresnet18"', '"model":"other"'),  # a row for another name
        lambda text: "[" * 100_000 + "]" * 100_000,  # too deep
        lambda text: " " * (cache_module.MAX_BYTES + 1),  # too large
    ],
)
def test_a_damaged_cache_file_is_rebuilt(damage):
    names = ["seresnet18", "resnet18"]
    first = scan(names, flops=False, cache=True).to_dict()
    [file] = cache_files()
    file.write_text(damage(file.read_text()))
    again = Recorder()
    assert scan(names, flops=False, cache=True, scan_one=again).to_dict() == first
    assert "seresnet18" in again.names
    third = Recorder()
    assert scan(names, flops=False, cache=True, scan_one=third).to_dict() == first and third.names == []


def test_other_versions_or_flops_do_not_use_the_cache(monkeypatch):
    scan(["seresnet18"], flops=False, cache=True)
    with_flops = Recorder()
    scan(["seresnet18"], flops=True, cache=True, scan_one=with_flops)
    assert with_flops.names == ["seresnet18"]
    monkeypatch.setattr(cache_module, "_version", lambda package: "99.0")
    newer = Recorder()
    scan(["seresnet18"], flops=False, cache=True, scan_one=newer)
    assert newer.names == ["seresnet18"]


def test_a_cache_folder_that_cannot_be_written_leaves_one_note(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ECA_SURGERY_CACHE", str(blocker / "cache"))
    result = scan(MIXED, flops=False, cache=True)
    assert result.without_se == 1 and len(result.notes) == 1 and "ECA_SURGERY_CACHE" in result.notes[0]
    assert "could not be written" in result.notes[0]


def test_cache_folder_follows_the_platform(monkeypatch, tmp_path):
    monkeypatch.setenv("ECA_SURGERY_CACHE", str(tmp_path))
    assert cache_module.cache_dir() == tmp_path
    monkeypatch.delenv("ECA_SURGERY_CACHE")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.cache_dir() == tmp_path / "xdg" / "eca-surgery"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the spec says
    assert cache_module.cache_dir() == Path.home() / ".cache" / "eca-surgery"


def test_a_cached_cli_rescan_is_identical_and_imports_neither_torch_nor_timm():
    args = ["scan", "seresnet1*", "--jobs", "2", "--json"]
    first = run_ok(args)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "eca_surgery", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == json.loads(first)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "timm" not in imported and "eca_surgery.cli" in imported
