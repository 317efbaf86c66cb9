"""Attacks found by an adversarial review of issue 10's hardening: outputs that alias
inputs, interrupts that surface inside cleanup, and friends. Each test reproduces one
failure of the reviewed main and pins down its fix."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_helpers import run_fail, run_ok

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


# recipe text reaches the terminal: no control characters (escape sequences)


@pytest.mark.parametrize(
    "field",
    [
        'name: "\\e]0;pwned\\a\\e[2J"',
        'description: "ok\\e[31mred"',
        'rules:\n  - action: replace\n    select: {path: "layer1\\e[2J"}',
        'rules:\n  - action: replace\n    select: {regex: ["layer1", "x\\x9b2J"]}',
    ],
)
def test_control_characters_in_recipe_text_are_refused(tmp_path, monkeypatch, field):
    """Before: a name with terminal escapes was valid and printed raw in the plan's title."""
    monkeypatch.chdir(tmp_path)
    text = "version: 1\n" + field + "\n"
    if "rules:" not in field:
        text += "rules:\n  - action: replace\n    select: {se: true}\n"
    (tmp_path / "r.yaml").write_text(text)
    for args in (["recipe", "check", "r.yaml"], ["convert", "seresnet18", "-r", "r.yaml", "--dry-run"]):
        msg = run_fail(args, tmp_path)
        assert "control character" in msg and "\x1b" not in msg and "\x9b" not in msg


def test_description_may_hold_newlines_and_tabs():
    from eca_surgery.recipe import parse_recipe

    text = (
        'version: 1\ndescription: "two\\nlines\\tok"\nrules:\n  - action: replace\n    select: {se: true}\n'
    )
    assert parse_recipe(text).description == "two\nlines\tok"


# heal --resume with a damaged or foreign record or optimizer state


SMALL = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """A patched seresnet18 (32x32), 4 images, and a 1-step heal run of it."""
    import timm
    from safetensors.torch import save_file

    from eca_surgery.checkpoint import save_patched
    from eca_surgery.recipe import load_recipe
    from eca_surgery.surgery import convert

    root = tmp_path_factory.mktemp("healed")
    teacher = root / "teacher.safetensors"
    save_file(timm.create_model("seresnet18", **SMALL).state_dict(), teacher)
    _images(root / "images", 4)
    conv = convert("seresnet18", load_recipe("se-to-eca"), checkpoint=teacher, check=False, **SMALL)
    save_patched(conv.model, root / "patched.safetensors", conv.plan, model_kwargs=SMALL)

    run_ok(_heal(root, root / "healed.safetensors", "--steps", "1"))
    return root


def _heal(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "heal", str(root / "patched.safetensors"), "-d", str(root / "images"), "-o", str(out),
        "--teacher-checkpoint", str(root / "teacher.safetensors"), "--batch-size", "2", "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _copy_run(root: Path, work: Path) -> Path:
    import shutil

    out = work / "healed.safetensors"
    shutil.copy(root / "healed.safetensors", out)
    shutil.copy(root / "healed.safetensors.heal-state.pt", work / "healed.safetensors.heal-state.pt")
    return out


@pytest.mark.parametrize(
    "record", ["[1, 2]", '"x"', '{"step": "x"}', '{"step": 1, "settings": []}', '{"step": -1}', "{not json"]
)
def test_resume_with_a_damaged_heal_record_is_a_clean_error(healed, tmp_path, record):
    """Before: TypeError or KeyError tracebacks."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = _copy_run(healed, tmp_path)
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(out), out, metadata={**meta, "heal": record})
    msg = run_fail(_heal(healed, out, "--steps", "2", "--resume"), tmp_path)
    assert "heal record" in msg and "damaged" in msg


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def _state_cases() -> dict:
    import torch

    return {
        "pickle-global": lambda good: {"step": good["step"], "optimizer": _Evil()},
        "list": lambda good: [1, 2],
        "optimizer-list": lambda good: {"step": good["step"], "optimizer": [1]},
        "other-shapes": lambda good: {
            "step": good["step"],
            "optimizer": {
                "state": {
                    k: {n: torch.zeros(7) if t.dim() else t for n, t in v.items()}
                    for k, v in good["optimizer"]["state"].items()
                },
                "param_groups": good["optimizer"]["param_groups"],
            },
        },
        "fewer-params": lambda good: {
            "step": good["step"],
            "optimizer": {
                "state": {},
                "param_groups": [dict(g, params=g["params"][:1]) for g in good["optimizer"]["param_groups"]],
            },
        },
        "groups-a-string": lambda good: {
            "step": good["step"],
            "optimizer": {"state": {}, "param_groups": "x"},
        },
    }


@pytest.mark.parametrize("case", ["pickle-global", "list", "optimizer-list", "other-shapes", "fewer-params",
                                  "groups-a-string", "text", "empty"])  # fmt: skip
def test_resume_with_a_damaged_or_foreign_state_is_a_clean_error(healed, tmp_path, monkeypatch, case):
    """Before: UnpicklingError, AttributeError, ValueError or a RuntimeError in the first step."""
    import torch

    monkeypatch.chdir(tmp_path)
    out = _copy_run(healed, tmp_path)
    state = tmp_path / "healed.safetensors.heal-state.pt"
    good = torch.load(state, weights_only=True)
    if case in ("text", "empty"):
        state.write_text("hello" if case == "text" else "")
    else:
        torch.save(_state_cases()[case](good), state)
    msg = run_fail(_heal(healed, out, "--steps", "2", "--resume"), tmp_path)
    assert "optimizer state" in msg and "--resume" in msg
    assert "weights_only` set to `False" not in msg  # never advise the unsafe way
    assert not (tmp_path / "PWNED").exists()


# names from untrusted files are quoted in messages: never as raw terminal escapes


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_escape_sequences_in_state_dict_keys_are_shown_escaped(tmp_path, monkeypatch, suffix):
    """Before: an unexpected key '\\x1b[2J...' cleared the user's terminal in the error."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    weights = {"\x1b[2J\x1b]0;pwn\x07EVIL": torch.zeros(1), "x\x9b31m": torch.zeros(1)}
    path = tmp_path / f"evil{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)
    msg = run_fail([*CONVERT, "-c", path.name, "--dry-run"], tmp_path)
    assert "\x1b" not in msg and "\x07" not in msg and "\x9b" not in msg
    assert "\\x1b[2J\\x1b]0;pwn\\x07EVIL" in msg and "x\\x9b31m" in msg


def test_printable_keeps_newlines_and_unicode():
    from eca_surgery.cli import printable

    assert printable("a\nb ünï€ 😀") == "a\nb ünï€ 😀"
    assert printable("a\tb\x1b[0m\x7f") == "a\\tb\\x1b[0m\\x7f"


def test_recipes_has_a_json_form():
    report = json.loads(run_ok(["recipes", "--json"]))
    names = {r["name"] for r in report["recipes"]}
    assert "se-to-eca" in names and all(Path(r["path"]).is_file() for r in report["recipes"])


# image folders: link loops, FIFOs, dangling links, extreme aspect ratios


def test_a_symbolic_link_loop_in_the_data_folder_does_not_hang(tmp_path):
    """Before: three links to the parent folder made the walk exponential (minutes)."""
    import subprocess
    import sys

    from PIL import Image

    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"up{i}").symlink_to("..", target_is_directory=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code = f"from eca_surgery.data import image_files; print(len(image_files({str(tmp_path)!r})))"
    env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("image_files still walking a link loop after 20 s")
    assert done.stdout.strip() == "1", done.stderr


def test_only_regular_image_files_are_listed(tmp_path):
    """Before: a FIFO named x.png was listed, and heal then blocked forever opening it."""
    import os

    from PIL import Image

    from eca_surgery.data import image_files

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "link.png"]


def test_an_extremely_long_image_is_cut_to_its_centre_first():
    """Before: a 60000x1 PNG made the eval resize allocate gigabytes (16 GB seen)."""
    import torch
    from PIL import Image
    from timm.data import create_transform

    from eca_surgery.data import MAX_ASPECT, central

    assert central(Image.new("RGB", (60000, 1))).size == (MAX_ASPECT, 1)
    assert central(Image.new("RGB", (1, 60000))).size == (1, MAX_ASPECT)
    img = Image.fromarray((torch.rand(40, 400, 3) * 255).byte().numpy())  # 10:1
    transform = create_transform(input_size=(3, 32, 32), crop_pct=0.875, is_training=False)
    assert central(img).size == (320, 40)
    assert torch.allclose(transform(central(img)), transform(img), atol=1e-6)
    square = Image.new("RGB", (50, 40))
    assert central(square) is square


# heal stopped by a signal exits with the signal's code, like every other command


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_heal_stopped_by_a_signal_exits_130_or_143(healed, tmp_path, monkeypatch, sig, code):
    """Before: exit code 1 and 'Error: Interrupted (SIGTERM) ...', as if the input were bad."""
    import os

    from cli_helpers import runner, text_of

    import eca_surgery.healing as heal_module
    from eca_surgery.cli import app

    real = heal_module.heal

    def heal_then_signal(*args, on_step=None, **kwargs):
        def hook(step, total, loss, speed):
            on_step(step, total, loss, speed)
            if step == 1:
                os.kill(os.getpid(), sig)

        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(heal_module, "heal", heal_then_signal)
    out = tmp_path / "healed.safetensors"
    result = runner.invoke(app, _heal(healed, out, "--steps", "3", "--json"))
    assert result.exit_code == code, text_of(result)
    assert result.stdout == "" and "Traceback" not in text_of(result)
    assert f"Interrupted ({sig.name}) after step 1 of 3; progress saved" in result.stderr
    assert out.is_file() and not [p for p in tmp_path.iterdir() if outputs.TMP_TAG in p.name]


def test_an_output_under_a_file_says_the_file_is_no_folder(tmp_path, monkeypatch):
    """Before: 'The folder of output ... does not exist', though it does, as a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_bytes(b"x")
    msg = run_fail([*CONVERT, "-o", "afile/x.safetensors"], tmp_path)
    assert "does not exist: 'afile' is a regular file, not a folder" in msg
    msg = run_fail([*CONVERT, "--timm-dir", "afile/td"], tmp_path)
    assert "does not exist: 'afile' is a regular file, not a folder" in msg
