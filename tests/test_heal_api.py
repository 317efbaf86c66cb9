"""heal from Python: a run prepared then trained, its result saved elsewhere, and settings
and errors that speak Python (parameters in backticks, which the CLI maps to its flags)."""

from __future__ import annotations

import json

import pytest
import torch
from heal_inputs import heal_inputs
from safetensors import safe_open

from eca_surgery.checkpoint import load_patched, open_patched
from eca_surgery.choices import Train
from eca_surgery.cli import FLAGS
from eca_surgery.errors import SurgeryError, with_flags
from eca_surgery.healing import HealResult, HealRun, HealSettings, prepare_heal, state_path, train

SMALL = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
FAST = {"steps": 2, "batch_size": 4, "lr": 0.01}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher checkpoint, its conversion saved with its source, and 8 generated images."""
    return heal_inputs(tmp_path_factory.mktemp("heal-api"), SMALL, 8, check=False, flops=False)


def _heal_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["heal"])


def test_a_prepared_run_trains_and_its_result_saves_elsewhere(setup, tmp_path):
    root, patched, teacher = setup
    out = tmp_path / "healed.safetensors"
    run = prepare_heal(
        patched, root / "images", out, teacher_checkpoint=teacher, settings=HealSettings(train="eca", **FAST)
    )
    assert isinstance(run, HealRun) and run.start == 0 and not run.resumed
    eca_paths = tuple(f"{e.eca_path}." for e in run.patched.plan.edits)
    assert run.trainable and all(name.startswith(eca_paths) for name in run.trainable)
    assert not out.exists()  # preparing writes nothing
    steps = []
    result = train(run, on_step=lambda step, total, loss, speed: steps.append((step, total)))
    assert isinstance(result, HealResult) and steps == [(1, 2), (2, 2)]
    assert result.step == 2 and len(result.losses) == 2 and result.history["step"] == 2
    assert out.is_file() and state_path(out).is_file()

    copy = result.save(tmp_path / "copy.safetensors")
    assert _heal_metadata(copy) == _heal_metadata(out) == json.loads(json.dumps(result.history))
    assert _heal_metadata(copy)["settings"]["train"] == "eca"
    assert not state_path(copy).exists()  # the optimizer state stays with the run's output
    assert open_patched(copy).record.provenance.heal["step"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_patched(copy)(x), result.model.eval()(x))
    with pytest.raises(SurgeryError, match="`force=True`"):
        result.save(copy)
    assert result.save(copy, force=True) == copy


def test_a_prepared_resume_continues_from_the_saved_step(setup, tmp_path):
    root, patched, teacher = setup
    out = tmp_path / "healed.safetensors"
    args = {"teacher_checkpoint": teacher}
    first = train(prepare_heal(patched, root / "images", out, settings=HealSettings(**FAST), **args))
    more = HealSettings(**(FAST | {"steps": 3}))
    run = prepare_heal(patched, root / "images", out, settings=more, resume=True, **args)
    assert run.resumed and run.start == 2
    result = train(run)
    assert result.start_step == 2 and result.step == 3 and len(result.losses) == 1
    record = _heal_metadata(out)
    assert record["step"] == 3 and record["loss_first"] == first.losses[0]
    assert record["loss_last"] == result.losses[-1]


def test_a_result_with_nothing_saved_refuses_to_save(setup, tmp_path):
    _, patched, _ = setup
    result = HealResult(open_patched(patched), HealSettings(), 0, 0)
    with pytest.raises(SurgeryError, match="no saved step"):
        result.save(tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("train_value", [Train.ALL, "all", Train.ECA, "eca", "norm"])
def test_settings_take_train_as_the_enum_or_its_string(train_value):
    settings = HealSettings(train=train_value)
    assert isinstance(settings.train, Train) and settings.train == Train(train_value)
    record = settings.to_dict()
    assert type(record["train"]) is str and record["train"] == str(train_value)
    assert json.loads(json.dumps(record))["train"] == str(train_value)
    assert HealSettings().train is Train.NORM


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train": "bias"}, "Unknown `train` 'bias'; choose one of: eca, norm, all."),
        ({"steps": 0}, "`steps` must be at least 1, got 0."),
        ({"steps": "3"}, "`steps` must be an integer, got '3'."),
        ({"batch_size": 0}, "`batch_size` must be at least 1, got 0."),
        ({"lr": 0.0}, "`lr` must be a positive finite number, got 0.0."),
        ({"lr": float("nan")}, "`lr` must be a positive finite number, got nan."),
        ({"temperature": -1.0}, "`temperature` must be a positive finite number, got -1.0."),
        ({"feature_weight": -1.0}, "`feature_weight` must be a finite number of at least 0, got -1.0."),
        ({"weight_decay": float("inf")}, "`weight_decay` must be a finite number of at least 0, got inf."),
    ],
)
def test_bad_settings_are_refused_naming_the_python_parameter(kwargs, message):
    with pytest.raises(SurgeryError) as caught:
        HealSettings(**kwargs)
    assert str(caught.value) == message


def test_the_cli_keeps_its_flag_text():
    """The CLI rewrites the parameters to its flags, so its messages read as before."""
    with pytest.raises(SurgeryError) as caught:
        HealSettings(train="bias")
    assert with_flags(str(caught.value), FLAGS).startswith("Unknown --train 'bias'; choose one of")
    with pytest.raises(SurgeryError) as caught:
        HealSettings(steps=0)
    assert with_flags(str(caught.value), FLAGS) == "--steps must be at least 1, got 0."


@pytest.mark.parametrize(
    "kwargs, expected, cli",
    [
        ({"save_every": -1}, "`save_every` must be 0", None),
        ({"workers": -1}, "`workers` must be from 0", None),
        ({"device": "banana"}, "`device` 'banana' is not a device", "--device 'banana' is not a device"),
        ({"device": "cuda:7"}, "pick one of them or `device='cpu'`", "pick one of them or --device cpu"),
        ({"resume": True}, "`resume=True`: ", "--resume: "),
    ],
)
def test_heal_errors_name_python_parameters(setup, tmp_path, kwargs, expected, cli):
    root, patched, _ = setup
    with pytest.raises(SurgeryError) as caught:
        prepare_heal(patched, root / "images", tmp_path / "out.safetensors", **kwargs)
    assert expected in str(caught.value) and "--" not in str(caught.value)
    if cli is not None:
        assert cli in with_flags(str(caught.value), FLAGS)
    assert not list(tmp_path.iterdir())


def test_an_existing_output_names_force_and_output(setup, tmp_path):
    root, patched, _ = setup
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(SurgeryError) as caught:
        prepare_heal(patched, root / "images", out)
    assert "Pass `force=True` to overwrite it, or choose another `output`." in str(caught.value)
    assert "Pass --force to overwrite it, or choose another --output." in with_flags(str(caught.value), FLAGS)
    assert out.read_bytes() == b"mine"
