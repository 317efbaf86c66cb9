"""Checkpoint format 2: a file stores its edits, and loading applies them as they are.

A format-2 file reloads bit for bit with the planner and the probe disabled; its record
survives the trip through metadata; and damaged metadata, or edits that do not fit the
model timm builds, are refused with one clean message naming the file, through the API
and through the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_fail, run_ok
from randomised import assert_same_tensors, randomise_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import eca_surgery.checkpoint
import eca_surgery.plan
import eca_surgery.probe
from eca_surgery.checkpoint import (
    FORMAT_VERSION,
    MAX_EDITS,
    CheckpointRecord,
    Provenance,
    load_patched,
    open_patched,
    save_patched,
)
from eca_surgery.errors import CheckpointError
from eca_surgery.surgery import convert

SMALL = {"num_classes": 10}
FORMAT1 = Path(__file__).parent / "fixtures" / "format1" / "test_efficientnet-se-to-eca-fit-se.safetensors"
CASES = [
    ("test_efficientnet", "se-to-eca"),  # in-place replacements
    ("test_efficientnet", "eca-in-blocks"),  # filled attention slots
    ("test_efficientnet", "eca-backbone-end"),  # an insert run by a hook
    ("test_resnet", "eca-after-stages"),  # inserts into plain Sequential stages
]


def _refuse(*args, **kwargs):
    raise AssertionError("the planner or the probe ran while loading a format-2 file")


@pytest.fixture
def no_planner(monkeypatch):
    """A function that makes ``make_plan`` and ``probe`` raise, in their modules and in every
    module that imported them (call it once the conversion is done)."""

    def disable() -> None:
        originals = {"make_plan": eca_surgery.plan.make_plan, "probe": eca_surgery.probe.probe}
        for name, module in list(sys.modules.items()):
            if name == "eca_surgery" or name.startswith("eca_surgery."):
                for attr, original in originals.items():
                    if getattr(module, attr, None) is original:
                        monkeypatch.setattr(module, attr, _refuse)
        assert eca_surgery.checkpoint.make_plan is _refuse and eca_surgery.plan.probe is _refuse

    return disable


def test_the_planner_is_really_disabled(no_planner):
    """A format-1 file stores no edits: it can only load by planning its recipe again."""
    no_planner()
    with pytest.raises(AssertionError, match="the planner or the probe ran"):
        open_patched(FORMAT1)


def _converted(name: str, recipe: str):
    conv = convert(name, recipe, check=False, flops=False, timm_native=False, **SMALL)
    randomise_(conv.model, seed=1)  # no tensor left at a value an initialisation gives
    return conv


@pytest.mark.parametrize("name, recipe", CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_a_format2_file_reloads_bit_for_bit_with_the_planner_disabled(tmp_path, no_planner, name, recipe):
    conv = _converted(name, recipe)
    no_planner()
    path = save_patched(conv.model, tmp_path / "p.safetensors", conv.plan, model_kwargs=conv.model_kwargs)
    patched = open_patched(path)
    assert patched.plan == conv.plan and patched.metadata["format_version"] == FORMAT_VERSION == "2"
    state = patched.model.state_dict()
    assert state.keys() == conv.model.state_dict().keys()
    assert_same_tensors(conv.model.state_dict(), state)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(patched.model(x), conv.model.eval()(x))


def test_the_record_survives_the_trip_through_metadata():
    conv = convert("test_efficientnet", "se-to-eca", init="fit-se", calib_size=2, flops=False, **SMALL)
    provenance = Provenance(conv.source, conv.native, conv.init, {"step": 3, "settings": {"lr": 0.001}})
    record = CheckpointRecord.of(conv.plan, conv.model_kwargs, provenance)
    metadata = record.to_metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    back = CheckpointRecord.from_metadata(metadata, "x.safetensors")
    assert back == record and back.plan == record.plan and back.provenance == record.provenance
    assert back.params_recorded == record.plan.params_after
    assert [e.to_dict() for e in back.plan.edits] == json.loads(metadata["edits"])


def test_saving_does_not_plan_either(tmp_path, no_planner):
    conv = _converted("test_efficientnet", "eca-backbone-end")
    no_planner()
    path = save_patched(conv.model, tmp_path / "p.safetensors", conv.plan, model_kwargs=SMALL)
    assert load_patched(path).state_dict().keys() == conv.model.state_dict().keys()


# damaged metadata: one clean error naming the file, through the API and the CLI


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small patched test_efficientnet (SE replaced), as tensors and metadata."""
    conv = convert("test_efficientnet", "se-to-eca", check=False, flops=False, timm_native=False, **SMALL)
    path = save_patched(
        conv.model, tmp_path_factory.mktemp("saved") / "p.safetensors", conv.plan, model_kwargs=SMALL
    )
    with safe_open(str(path), "pt") as f:
        return load_file(path), f.metadata()


def _edit(metadata: dict[str, str], **changes) -> str:
    """The metadata's edits with the first one changed."""
    edits = json.loads(metadata["edits"])
    edits[0].update(changes)
    return json.dumps(edits)


def _bad_metadata(metadata: dict[str, str]) -> dict[str, tuple[dict[str, str | None], str]]:
    """case -> (metadata changes, a part of the expected message); None removes a key."""
    first = json.loads(metadata["edits"])[0]
    huge = metadata["edits"].replace(f'"channels": {first["channels"]}', '"channels": ' + "9" * 5000, 1)
    return {
        "edits-not-json": ({"edits": '[{"path": '}, "damaged eca-surgery metadata"),
        "edits-not-a-list": ({"edits": '{"path": "x"}'}, "its edits are not a list"),
        "no-edits": ({"edits": None}, "no 'edits' entry"),
        "wrong-type": ({"edits": _edit(metadata, channels="128")}, "edit 0: edit field 'channels'"),
        "unknown-field": ({"edits": _edit(metadata, extra=1)}, "unknown field 'extra'"),
        "unknown-position": (
            {"edits": _edit(metadata, position="sideways")},
            "Unknown `position` 'sideways'; choose one of",
        ),
        "kernel-over-channels": (
            {"edits": _edit(metadata, kernel_size=first["channels"] + 1)},
            "at most the channel count",
        ),
        "huge-integer": ({"edits": huge}, "damaged eca-surgery metadata"),
        "huge-count": ({"params_before": "9" * 5000}, "is not a parameter count"),
        "too-many-edits": (
            {"edits": json.dumps([first] * (MAX_EDITS + 1))},
            f"more than the {MAX_EDITS}",
        ),
        "duplicate-edit": ({"edits": json.dumps([first, first])}, "two edits put an ECA block at"),
        "rule-matches": ({"rule_matches": "[5]"}, "do not count its edits"),
        "params-after": ({"params_after": "7"}, "its params_after 7"),
        "edit-of-no-rule": ({"edits": _edit(metadata, rule=3)}, "names no replace rule 3"),
        "heal-record": ({"heal": "{not json"}, "heal record is not JSON"),
        "init-record": ({"init": "[1]"}, "init record is not a JSON object"),
    }


def _misfits(metadata: dict[str, str]) -> dict[str, tuple[dict[str, str], str]]:
    """case -> (metadata changes, a part of the expected message): edits that do not fit."""
    first = json.loads(metadata["edits"])[0]
    insert = {**first, "action": "insert", "position": "after", "params_before": 0}
    insert["old_class"] = "torch.nn.modules.conv.Conv2d"
    recipe = json.loads(metadata["recipe"])
    recipe["rules"][0].update(action="insert", where="after", select={"path": ["conv_stem"]})
    after = str(int(metadata["params_before"]) + first["kernel_size"])
    one_insert = {"recipe": json.dumps(recipe), "rule_matches": "[1]", "params_after": after}
    return {
        "no-such-module": (
            {"edits": _edit(metadata, path="blocks.9.0.se", eca_path="blocks.9.0.se")},
            "there is no module there",
        ),
        "other-class": (
            {"edits": _edit(metadata, old_class="timm.layers.squeeze_excite.SEModule")},
            "it is timm.models._efficientnet_blocks.SqueezeExcite, not timm.layers.squeeze_excite.SEModule",
        ),
        "slot-that-is-no-attribute": (
            {"edits": _edit(metadata, position="slot", path="conv_stem.se", eca_path="conv_stem.se")},
            "conv_stem has no attention slot 'se'",
        ),
        "slot-that-is-full": (
            {"edits": _edit(metadata, position="slot")},
            "the slot is not empty: it holds timm.models._efficientnet_blocks.SqueezeExcite",
        ),
        "slot-that-is-no-attention": (
            {"edits": _edit(metadata, position="slot", path="conv_stem", eca_path="conv_stem")},
            "'conv_stem' is not an attention slot",
        ),
        "insert-elsewhere": (
            {
                "edits": json.dumps([{**insert, "path": "conv_stem", "eca_path": "blocks.0.eca"}]),
                **one_insert,
            },
            "its ECA path 'blocks.0.eca' is in neither the module nor its parent",
        ),
        "insert-over-a-method": (
            {
                "edits": json.dumps([{**insert, "path": "conv_stem", "eca_path": "conv_stem.forward"}]),
                **one_insert,
            },
            "'conv_stem.forward' is taken already",
        ),
    }


def _write(tmp_path, saved, changes: dict[str, str | None]):
    tensors, metadata = saved
    bad = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    path = tmp_path / "evil.safetensors"
    save_file(tensors, str(path), metadata=bad)
    return path


CASE_NAMES = [
    "edits-not-json", "edits-not-a-list", "no-edits", "wrong-type", "unknown-field", "unknown-position",
    "kernel-over-channels", "huge-integer", "huge-count", "too-many-edits", "duplicate-edit", "rule-matches",
    "params-after", "edit-of-no-rule", "heal-record", "init-record",
]  # fmt: skip
MISFIT_NAMES = [
    "no-such-module", "other-class", "slot-that-is-no-attribute", "slot-that-is-full", "slot-that-is-no-attention",
    "insert-elsewhere", "insert-over-a-method",
]  # fmt: skip


def _refused(tmp_path, saved, changes: dict[str, str | None], expected: str) -> tuple[Path, str]:
    """Load a copy of ``saved`` with ``changes`` by the API and verify it by the CLI: both must
    refuse it with a message holding ``expected``; the API's message and the file."""
    path = _write(tmp_path, saved, changes)
    with pytest.raises(CheckpointError) as error:
        load_patched(path)
    message = str(error.value)
    assert expected in message and "re-export it" in message
    cli = run_fail(["verify", str(path)], tmp_path)
    assert str(path) in cli and expected in cli
    return path, message


@pytest.mark.parametrize("case", CASE_NAMES)
def test_damaged_metadata_is_one_clean_error(tmp_path, saved, case, no_planner):
    no_planner()
    path, message = _refused(tmp_path, saved, *_bad_metadata(saved[1])[case])
    assert f"{str(path)!r} has damaged eca-surgery metadata" in message


@pytest.mark.parametrize("case", MISFIT_NAMES)
def test_edits_that_do_not_fit_the_model_are_refused(tmp_path, saved, case, no_planner):
    no_planner()
    path, message = _refused(tmp_path, saved, *_misfits(saved[1])[case])
    assert message.startswith(f"Checkpoint {str(path)!r} holds edits that do not fit test_efficientnet")
    assert "edit 0 (" in message


def test_a_tampered_parameter_count_fails_verify(tmp_path, saved):
    """Both counts changed together pass the record's own check; the rebuilt model's count does not."""
    tensors, metadata = saved
    before, after = int(metadata["params_before"]), int(metadata["params_after"])
    path = _write(tmp_path, saved, {"params_before": str(before + 1), "params_after": str(after + 1)})
    assert load_patched(path) is not None
    assert f"has {after} parameters but the file records {after + 1}" in run_fail(
        ["verify", str(path)], tmp_path
    )
    path.unlink()
    report = json.loads(run_ok(["verify", str(_write(tmp_path, saved, {})), "--json"]))
    assert report["params_after"] == after


@pytest.mark.parametrize("path", sorted((FORMAT1.parent.parent / "format2").glob("*.safetensors")), ids=str)
def test_the_format2_fixtures_load_with_the_planner_disabled(path, no_planner):
    no_planner()
    assert_same_tensors(load_file(path), load_patched(path).state_dict())
