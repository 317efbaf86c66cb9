"""Attacks found by an adversarial review of issue 10's hardening: outputs that alias
inputs, interrupts that surface inside cleanup, and friends. Each test reproduces one
failure of the reviewed main and pins down its fix."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_helpers import run_fail

import eca_surgery.outputs as outputs

CONVERT = ["convert", "seresnet18", "-r", "se-to-eca"]


def _export(folder: Path) -> Path:
    """An earlier --timm-dir export (marker and all), that --force may replace."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    marker = {"format": "eca-surgery", "kind": "timm-dir", "version": 1, "files": ["model.safetensors"]}
    (folder / outputs.MARKER).write_text(json.dumps(marker))
    return folder


def _images(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    return folder


# outputs must never replace an input, even with --force


def test_convert_output_equal_to_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src.pth").write_bytes(b"weights")
    msg = run_fail([*CONVERT, "-c", "src.pth", "-o", "src.pth", "--force"], tmp_path)
    assert "would replace the checkpoint" in msg
    msg = run_fail([*CONVERT, "-c", str(tmp_path / "src.pth"), "-o", "./src.pth", "--force"], tmp_path)
    assert "would replace the checkpoint" in msg
    assert (tmp_path / "src.pth").read_bytes() == b"weights"


def test_convert_output_equal_to_recipe_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    text = "version: 1\nrules:\n  - action: replace\n    select: {se: true}\n"
    recipe.write_text(text)
    msg = run_fail(["convert", "seresnet18", "-r", "r.yaml", "-o", "r.yaml", "--force"], tmp_path)
    assert "would replace the recipe" in msg
    assert recipe.read_text() == text


def test_timm_dir_holding_the_checkpoint_is_refused(tmp_path, monkeypatch):
    """An earlier export's model.safetensors as the source, and that export replaced: the
    input would be deleted."""
    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "export")
    args = [*CONVERT, "-c", "export/model.safetensors", "--timm-dir", "export", "--force"]
    assert "would replace the checkpoint" in run_fail(args, tmp_path)


@pytest.mark.parametrize("output", ["same", "same/model.safetensors"])
def test_output_and_timm_dir_must_be_apart(tmp_path, monkeypatch, output):
    """Before: the whole conversion ran, the file was written, then the timm folder failed
    with 'is not a regular file, not a folder'."""
    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "same") if "/" in output else None
    msg = run_fail([*CONVERT, "-o", output, "--timm-dir", "same", "--force"], tmp_path)
    assert "one holds the other" in msg


def test_timm_dir_that_is_a_regular_file_is_called_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    msg = run_fail([*CONVERT, "--timm-dir", "file", "--force"], tmp_path)
    assert "is a regular file, not a folder" in msg


@pytest.mark.parametrize("which", ["patched", "teacher"])
def test_heal_output_equal_to_an_input_is_refused(tmp_path, monkeypatch, which):
    monkeypatch.chdir(tmp_path)
    images = _images(tmp_path / "images")
    (tmp_path / "p.safetensors").write_bytes(b"patched")
    (tmp_path / "t.pth").write_bytes(b"teacher")
    out = "p.safetensors" if which == "patched" else "t.pth"
    args = ["heal", "p.safetensors", "-d", str(images), "-o", out, "--force", "--device", "cpu"]
    args += ["--teacher-checkpoint", "t.pth"]
    assert f"would replace the {which}" in run_fail(args, tmp_path)


# an interrupt that surfaces while a cleanup starts must not stop the cleanup


def test_interrupt_pending_when_a_cleanup_starts_is_held_until_it_ends(tmp_path, monkeypatch):
    """A signal that arrived just before a critical step surfaces in Python at the step's
    first instruction; blocking signals in the OS does not hold it. The step must still
    run whole (here: removing a temporary folder), and the interrupt be raised after."""
    tmp = tmp_path / ".x.eca-surgery-tmp-1-ab"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"x")
    calls = {"n": 0}

    def surfaces_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_signal(*args, **kwargs)

    def sigmask_surfaces(*args, **kwargs):  # the same, for a deferral by signal masks
        raise KeyboardInterrupt

    real_signal = signal.signal
    monkeypatch.setattr(signal, "signal", surfaces_once)
    monkeypatch.setattr(signal, "pthread_sigmask", sigmask_surfaces)
    with pytest.raises(KeyboardInterrupt):
        outputs._remove(tmp)
    assert not tmp.exists()


def test_signal_during_a_deferred_step_is_acted_on_after_it(tmp_path):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with outputs._signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
