"""Checkpoints written by earlier releases load in this one: a file is a promise.

``tests/fixtures/format1`` holds files that eca-surgery 0.1.0 (commit 822f4e1, checkpoint
format 1) wrote for timm's tiny ``test_efficientnet`` with ``num_classes=10``: SE replaced
with a fitted ECA, and an identity ECA inserted at the backbone end.
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


def test_the_fixtures_are_there():
    assert [p.name for p in FILES] == [
        "test_efficientnet-backbone-end-identity.safetensors",
        "test_efficientnet-se-to-eca-fit-se.safetensors",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_format1_file_loads_bit_for_bit_and_verifies(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format_version"] == "1" and metadata["eca_surgery_version"] == "0.1.0"
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


def test_an_identity_eca_from_format1_still_computes_the_identity():
    """The inserted ECA of the identity fixture leaves the model's function unchanged: the
    file's other tensors in the unpatched model give the same logits."""
    path = FIXTURES / "test_efficientnet-backbone-end-identity.safetensors"
    patched = load_patched(path)
    [edit] = open_patched(path).plan.edits
    original = timm.create_model("test_efficientnet", num_classes=10).eval()
    stored = load_file(path)
    original.load_state_dict({k: v for k, v in stored.items() if not k.startswith(edit.eca_path + ".")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), original(x), rtol=0, atol=1e-6)
