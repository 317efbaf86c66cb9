"""benchmarks/sweep_torchvision.py on two small builders: its checks pass where the conversion is
right, and fail where the expected delta, a kernel size or the conversion itself is wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "sweep_torchvision.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_paper_rule_written_out_in_the_benchmark(sweep):
    # t = int(|(log2 C + 1) / 2|), made odd: 16 -> 2 -> 3, 64 -> 3, 256 -> 4 -> 5, 1024 -> 5, 4096 -> 6 -> 7
    assert [sweep.paper_kernel(c) for c in (16, 64, 256, 1024, 4096)] == [3, 3, 5, 5, 7]


def test_mobilenet_v3_small_converts_with_the_independent_delta(sweep):
    row = sweep.check_builder("mobilenet_v3_small")
    assert row.ok and row.delta_ok and row.forward_ok, row
    assert (row.task, row.se_blocks, row.edits, row.check) == ("classification", 9, 9, "forward")
    assert (row.params_before, row.params_after) == (2_542_856, 2_081_255)


def test_lraspp_keeps_its_out_map_and_the_issue_figures(sweep):
    row = sweep.check_builder("lraspp_mobilenet_v3_large")
    assert row.ok, row
    assert (row.task, row.se_blocks) == ("segmentation", 8)
    assert (row.params_before, row.params_after) == (3_221_538, 1_709_292)


def test_a_builder_without_se_gives_no_row(sweep):
    assert sweep.check_builder("squeezenet1_0") is None


def test_the_meta_path_checks_shapes_only(sweep):
    row = sweep.check_builder("mobilenet_v3_small", max_params=0)
    assert row.ok and row.check == "meta forward (shapes)"
    assert (row.params_before, row.params_after) == (2_542_856, 2_081_255)


def test_a_planted_wrong_delta_fails_the_check(sweep):
    row = sweep.check_builder("mobilenet_v3_small", expected=lambda m: sweep.expected_delta(m) + 1)
    assert row.forward_ok and not row.delta_ok and not row.ok


def test_a_wrong_kernel_rule_fails_the_check(sweep, monkeypatch):
    monkeypatch.setattr(sweep, "paper_kernel", lambda channels: 3)  # mobilenet_v3_small has 5s too
    row = sweep.check_builder("mobilenet_v3_small")
    assert not row.delta_ok and not row.ok


def test_a_failing_conversion_is_reported_not_hidden(sweep, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure\nsecond line")

    monkeypatch.setattr(sweep, "make_plan", broken)
    row = sweep.run_one("lraspp_mobilenet_v3_large", 100e6)
    assert not row.ok and row.error == "RuntimeError: planted failure"
    lines = sweep.summary([row], scanned=1, wall=1.0, max_params=100e6)
    assert (
        "converted 0/1" in lines[0]
        and lines[-1] == "FAILED lraspp_mobilenet_v3_large: RuntimeError: planted failure"
    )
