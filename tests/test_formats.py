"""Checkpoints written by earlier releases load in this one: a file is a promise.

``tests/fixtures/format1`` holds files that eca-surgery 0.1.0 (commit 822f4e1, checkpoint
format 1) wrote for timm's tiny ``test_efficientnet`` with ``num_classes=10``: SE replaced
with a fitted ECA, and an identity ECA inserted at the backbone end.

``tests/fixtures/format2`` holds the same two conversions written in checkpoint format 2
(the edits stored, loaded without planning) by eca-surgery 0.2.0, the release that
introduced it. They were made by :func:`write_format2_fixtures`; never regenerate them to make a test pass (they
stand for files users already have). Only a new format gets new fixtures, in a new folder:
``PYTHONPATH=.:tests python tests/test_formats.py`` writes format-2 files into
``tests/fixtures/format2``.

``tests/fixtures/format2-0.3.0`` holds files written by 0.3.0, which added to format 2 a
recorded ``dtype``, ``torchvision:`` model names and edits at traced stages (made by
:func:`write_fixtures` with ``CONVERSIONS_030``; never regenerate them either).

``tests/fixtures/format2-0.4.0`` holds files written by 0.4.0, whose fit-se folds a factor into
the model's own norms or convolutions and records each fold in the ``init`` metadata (made by
:func:`write_fixtures` with ``CONVERSIONS_040``; never regenerate them either).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import run_ok
from safetensors import safe_open
from safetensors.torch import load_file

from eca_surgery import load_patched
from eca_surgery.checkpoint import open_patched

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
FILES = sorted(FIXTURES.glob("*.safetensors"))
FORMAT2 = Path(__file__).parent / "fixtures" / "format2"
FILES2 = sorted(FORMAT2.glob("*.safetensors"))
NAMES = [
    "test_efficientnet-backbone-end-identity.safetensors",
    "test_efficientnet-se-to-eca-fit-se.safetensors",
]
# the conversions of the fixtures: file name -> CLI arguments (calibrated on seeded noise)
CONVERSIONS = {
    NAMES[0]: ["-r", "eca-backbone-end", "--init", "identity"],
    NAMES[1]: ["-r", "se-to-eca", "--init", "fit-se"],
}


def write_format2_fixtures(folder: Path = FORMAT2) -> None:
    """Write the format-2 fixtures into ``folder`` with this eca-surgery (by the CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, args in CONVERSIONS.items():
        common = ["--model-arg", "num_classes=10", "--calib-size", "4", "--force", "-o", str(folder / name)]
        run_ok(["convert", "test_efficientnet", *args, *common])


FORMAT2_030 = Path(__file__).parent / "fixtures" / "format2-0.3.0"
# files 0.3.0 wrote with what it added to format 2: a recorded dtype, torchvision names, traced stages
CONVERSIONS_030 = {
    "test_efficientnet-se-to-eca-float16.safetensors": [
        "test_efficientnet", "-r", "se-to-eca", "--dtype", "float16", "--model-arg", "num_classes=10",
    ],
    "torchvision-mobilenet_v3_small-after-stages-bfloat16.safetensors": [
        "torchvision:mobilenet_v3_small", "-r", "eca-after-stages", "--dtype", "bfloat16",
        "--model-arg", "num_classes=10",
    ],
}  # fmt: skip


def write_fixtures(conversions: dict[str, list[str]], folder: Path) -> None:
    """Write ``conversions`` (file name -> convert arguments) into ``folder`` with this
    eca-surgery (by the CLI): ``write_fixtures(CONVERSIONS_040, FORMAT2_040)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, args in conversions.items():
        run_ok(["convert", *args, "--force", "-o", str(folder / name)])


FORMAT2_040 = Path(__file__).parent / "fixtures" / "format2-0.4.0"
# files 0.4.0 wrote with what it added: fit-se's folds into a convolution (test_efficientnet's
# conv_pwl) and into norms and convolutions (test_byobnet), recorded per block in the init record
CONVERSIONS_040 = {
    "test_efficientnet-se-to-eca-fit-se-fold.safetensors": [
        "test_efficientnet", "-r", "se-to-eca", "--init", "fit-se", "--calib-size", "4",
        "--model-arg", "num_classes=10",
    ],
    "test_byobnet-se-to-eca-fit-se-fold.safetensors": [
        "test_byobnet", "-r", "se-to-eca", "--init", "fit-se", "--calib-size", "4",
        "--model-arg", "num_classes=10",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONVERSIONS_040))
def test_a_040_file_with_folds_loads_bit_for_bit_and_verifies(name):
    path = FORMAT2_040 / name
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["eca_surgery_version"] == "0.4.0" and metadata["format_version"] == "2"
    blocks = json.loads(metadata["init"])["blocks"]
    assert blocks and all(b["fold"] and b["fold"]["tensors"] and "scale_r2" in b for b in blocks)
    kinds = {b["fold"]["kind"] for b in blocks}
    assert kinds == ({"conv"} if name.startswith("test_efficientnet") else {"conv", "norm"})
    model, stored = load_patched(path), load_file(path)
    state = model.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in stored)
    assert json.loads(run_ok(["verify", str(path), "--json"]))["check"]["output_shape"] == [1, 10]


@pytest.mark.parametrize("name", sorted(CONVERSIONS_030))
def test_a_030_file_loads_in_its_dtype_and_verifies(name):
    path = FORMAT2_030 / name
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["eca_surgery_version"] == "0.3.0" and metadata["format_version"] == "2"
    model = load_patched(path)
    stored = load_file(path)
    state = model.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in stored)
    assert {str(t.dtype) for t in state.values() if t.is_floating_point()} == {f"torch.{metadata['dtype']}"}
    report = json.loads(run_ok(["verify", str(path), "--json"]))
    assert report["dtype_recorded"] == metadata["dtype"] and report["check"]["output_shape"] == [1, 10]


def test_the_fixtures_are_there():
    assert [p.name for p in FILES] == NAMES
    assert [p.name for p in FILES2] == NAMES


@pytest.mark.parametrize("path", FILES + FILES2, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_a_file_of_each_format_loads_bit_for_bit_and_verifies(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if path.parent == FIXTURES:
        assert metadata["format_version"] == "1" and metadata["eca_surgery_version"] == "0.1.0"
    else:
        assert metadata["format_version"] == "2" and json.loads(metadata["edits"])
    patched = open_patched(path)
    assert patched.model_kwargs == {"num_classes": 10}
    state = patched.model.state_dict()
    stored = load_file(path)
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    report = json.loads(run_ok(["verify", str(path), "--json"]))
    assert report["check"]["output_shape"] == [1, 10] and report["params_after"] == int(
        metadata["params_after"]
    )


@pytest.mark.parametrize("folder", [FIXTURES, FORMAT2], ids=lambda p: p.name)
def test_an_identity_eca_still_computes_the_identity(folder):
    """The inserted ECA of the identity fixture leaves the model's function unchanged: the
    file's other tensors in the unpatched model give the same logits."""
    path = folder / NAMES[0]
    patched = load_patched(path)
    [edit] = open_patched(path).plan.edits
    original = timm.create_model("test_efficientnet", num_classes=10).eval()
    stored = load_file(path)
    original.load_state_dict({k: v for k, v in stored.items() if not k.startswith(edit.eca_path + ".")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), original(x), rtol=0, atol=1e-6)


def test_a_format1_record_is_planned_again_and_a_format2_record_is_read():
    """Format 1 stored the recipe only: its edits come from planning it again, and equal those
    format 2 stores for the same conversion."""
    old, new = open_patched(FIXTURES / NAMES[1]), open_patched(FORMAT2 / NAMES[1])
    assert old.record.versions.eca_surgery == "0.1.0" and old.record.provenance.init["method"] == "fit-se"
    assert old.plan.edits == new.plan.edits and old.plan.rule_matches == new.plan.rule_matches == (2,)
    assert new.record.provenance.native == {
        "kwargs": {"num_classes": 10, "se_layer": "eca"},
        "model": "test_efficientnet",
    }


if __name__ == "__main__":
    write_format2_fixtures()
