"""`scan --source torchvision`: torchvision's builders scanned by name, like timm's models."""

import json

import pytest
from cli_helpers import run_fail, run_ok, run_usage_error

from eca_surgery.errors import SurgeryError
from eca_surgery.scan import model_names, scan


def test_scan_torchvision_lists_mobilenet_v3_with_issue_numbers():
    report = json.loads(run_ok(["scan", "mobilenet_v3*", "--source", "torchvision", "--json", "--no-flops"]))
    rows = {r["model"]: r for r in report["models"]}
    assert set(rows) == {"torchvision:mobilenet_v3_large", "torchvision:mobilenet_v3_small"}
    assert (report["scanned"], report["with_se"], report["failed"]) == (2, 2, 0)
    large = rows["torchvision:mobilenet_v3_large"]
    assert (large["params_before"], large["params_after"]) == (5_483_032, 3_970_786)
    assert large["se_blocks"] == {"SqueezeExcitation": 8}
    assert large["macs_before"] is None  # --no-flops


def test_scan_torchvision_counts_macs_and_rows_without_se():
    result = scan(model_names("mobilenet_v3_small", "torchvision") + ["torchvision:resnet18"])
    assert (result.scanned, len(result.rows), result.without_se, result.failures) == (2, 1, 1, {})
    row = result.rows[0]
    assert row.model == "torchvision:mobilenet_v3_small"
    assert 0 < row.macs_after < row.macs_before


def test_scan_torchvision_no_match_names_the_source(tmp_path):
    assert "No torchvision model matches 'zzz*'" in run_fail(
        ["scan", "zzz*", "--source", "torchvision"], tmp_path
    )
    with pytest.raises(SurgeryError, match="No torchvision model matches"):
        model_names("seresnet18", "torchvision")  # a timm name, not a torchvision builder
    assert "--source" in run_usage_error(["scan", "resnet18", "--source", "keras"], tmp_path)


def test_scan_default_source_is_timm():
    assert model_names("seresnet18") == model_names("seresnet18", "timm") == ["seresnet18"]
    report = json.loads(run_ok(["scan", "seresnet18", "--json", "--no-flops"]))
    assert [r["model"] for r in report["models"]] == ["seresnet18"]
    assert set(report) == {"scanned", "with_se", "without_se", "failed", "shown", "models", "failures"}
