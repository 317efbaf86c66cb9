"""The Python API used carelessly or with hostile input: every misuse is the tool's own
error (nothing raw from torch), nothing half-written is left, and edits that would make a
model other than the one planned are refused."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from eca_surgery import (
    CheckpointError,
    Edit,
    Gate,
    Position,
    SurgeryError,
    apply_plan,
    convert,
    load_recipe,
    save_patched,
)
from eca_surgery.apply import count_eca_calls
from eca_surgery.models import create_model
from eca_surgery.plan import Plan, make_plan

SMALL = {"num_classes": 10}


@pytest.fixture(scope="module")
def conversion():
    return convert("seresnet18", "se-to-eca", check=False, flops=False, **SMALL)


def _changed(conversion, change):
    changed = copy.copy(conversion)
    changed.model = copy.deepcopy(conversion.model)
    change(changed.model)
    return changed


CHANGES = {
    "module-added": lambda m: m.add_module("extra", nn.Linear(2, 2)),
    "eca-removed": lambda m: setattr(m.layer1[0], "se", nn.Identity()),
    "head-resized": lambda m: setattr(m, "fc", nn.Linear(512, 7)),
    "integer-buffer": lambda m: setattr(m.bn1, "running_mean", torch.zeros(64, dtype=torch.int64)),
}


@pytest.mark.parametrize("case", CHANGES)
def test_save_timm_dir_of_a_changed_model_is_refused_cleanly(conversion, tmp_path, case):
    """A model changed after conversion no longer fits its timm-native variant: the export is
    refused by the tool's own error (not torch's load_state_dict RuntimeError) and writes nothing."""
    changed = _changed(conversion, CHANGES[case])
    with pytest.raises(CheckpointError, match="Nothing was written"):
        changed.save_timm_dir(tmp_path / "timm")
    assert list(tmp_path.iterdir()) == []


def test_saving_a_model_on_the_meta_device_is_refused(tmp_path):
    """A model with no data (built on the meta device, as make_plan allows) cannot be saved:
    a SurgeryError saying so, not torch's NotImplementedError, and no file left."""
    model = create_model("seresnet18", meta=True, **SMALL)
    plan = make_plan(model, load_recipe("se-to-eca"), "seresnet18")
    apply_plan(model, plan)
    with pytest.raises(SurgeryError, match="meta device"):
        save_patched(model, tmp_path / "m.safetensors", plan, model_kwargs=SMALL)
    assert list(tmp_path.iterdir()) == []


class _Looped(nn.Module):
    """A model whose forward runs every block of a ModuleList in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def _insert(path: str, eca_path: str) -> Edit:
    return Edit(
        path=path,
        action="insert",
        position=Position.AFTER,
        eca_path=eca_path,
        old_class="torch.nn.modules.conv.Conv2d",
        new_class="timm.layers.eca.EcaModule",
        channels=8,
        kernel_size=3,
        gate=Gate.SIGMOID,
        params_before=0,
        params_after=3,
        rule=0,
    )


def test_an_insert_into_a_container_that_runs_its_children_is_refused():
    """An ECA put as a child of a ModuleList (run by its owner's loop) and hooked on its module
    would run twice; the planner never makes such an edit, and a file holding one (crafted, or
    written where the owner was a plain Sequential) must be refused, not applied."""
    model = _Looped()
    plan = Plan("looped", load_recipe("eca-backbone-end"), (_insert("blocks.0", "blocks.0_eca"),), 0, (1,))
    with pytest.raises(SurgeryError, match="runs every child it holds"):
        apply_plan(model, plan)
    inside = replace(plan, edits=(_insert("blocks.0", "blocks.0.eca"),))
    assert count_eca_calls(apply_plan(_Looped(), inside), torch.randn(1, 3, 8, 8)) == {"blocks.0.eca": 1}


def test_an_edit_made_with_strings_holds_enums():
    """Position and Gate are str enums, so a notebook user may write them as strings: the edit
    holds the members (``to_dict`` and ``position.inserts`` work), and a wrong one is refused."""
    fields = _insert("blocks.0", "blocks.0.eca").to_dict()
    edit = Edit(**fields)
    assert edit.position is Position.AFTER and edit.gate is Gate.SIGMOID
    assert edit.position.inserts and edit.to_dict() == fields
    with pytest.raises(ValueError, match="Unknown `position` 'sideways'; choose one of"):
        Edit(**{**fields, "position": "sideways"})


@pytest.mark.parametrize("value", [True, 2.5, "8"])
def test_calib_size_must_be_an_integer(value):
    with pytest.raises(SurgeryError, match="`calib_size` must be an integer, got"):
        convert("seresnet18", "se-to-eca", init="fit-se", calib_size=value, dry_run=True)


def test_a_slot_edit_fills_only_an_attention_slot(tmp_path):
    """A crafted file may not put an ECA block into any empty attribute: ResNet's
    ``downsample`` is None in blocks that keep their shape, and an ECA there would change
    the function of a model whose every weight loads."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from eca_surgery import CheckpointError, convert, load_patched

    result = convert("resnet18", "eca-in-blocks")
    path = result.save(tmp_path / "r18.safetensors")
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edits = json.loads(metadata["edits"])
    assert edits[0]["path"] == "layer1.0.se"
    edits[0].update(path="layer1.0.downsample", eca_path="layer1.0.downsample")
    tensors["layer1.0.downsample.conv.weight"] = tensors.pop("layer1.0.se.conv.weight")
    save_file(tensors, tmp_path / "evil.safetensors", metadata={**metadata, "edits": json.dumps(edits)})
    with pytest.raises(CheckpointError, match="'downsample' is not an attention slot"):
        load_patched(tmp_path / "evil.safetensors")
