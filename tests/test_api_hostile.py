"""The Python API as a notebook calls it: bad input gives a SurgeryError, never another
exception, and nothing unloadable is written."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import eca_surgery as es
from eca_surgery.errors import SurgeryError
from eca_surgery.surgery import verify

LONG = "a" * 5000  # longer than any file name the OS takes (ENAMETOOLONG)


@pytest.mark.parametrize(
    "call",
    [
        lambda: es.load_recipe(LONG),
        lambda: es.load_patched(LONG),
        lambda: verify(LONG),
        lambda: es.convert("seresnet18", "se-to-eca", checkpoint=LONG, dry_run=True),
    ],
    ids=["load_recipe", "load_patched", "verify", "convert-checkpoint"],
)
def test_a_name_too_long_is_a_surgery_error(call):
    with pytest.raises(SurgeryError, match="cannot be read: File name too long"):
        call()


def test_an_unsearchable_folder_is_a_surgery_error(monkeypatch, tmp_path):
    """EACCES on the way to an input (root cannot see it, so simulate it)."""
    real_stat = os.stat

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    for call in (
        lambda: es.load_recipe(tmp_path / "r.yaml"),
        lambda: es.load_patched(tmp_path / "m.safetensors"),
    ):
        with pytest.raises(SurgeryError, match="Permission denied"):
            call()


def test_cli_name_too_long_has_no_traceback(tmp_path):
    from cli_helpers import run_fail

    for args in (["recipe", "check", LONG], ["verify", LONG], ["inspect", "seresnet18", "-r", LONG]):
        assert "File name too long" in run_fail(args, tmp_path)


def test_recipe_may_be_given_by_name_or_path():
    by_name = es.inspect("seresnet18", "se-to-eca")
    assert by_name.plan is not None and by_name.plan.edits
    with pytest.raises(TypeError, match="recipe must be"):
        es.inspect("seresnet18", 3)


@pytest.fixture(scope="module")
def converted():
    recipe = es.load_recipe("se-to-eca")
    return es.convert("seresnet18", recipe, check=False, flops=False, timm_native=False, num_classes=7)


def test_save_refuses_a_model_its_plan_does_not_rebuild(converted, tmp_path):
    import timm

    out = tmp_path / "m.safetensors"
    unpatched = timm.create_model("seresnet18", pretrained=False, num_classes=7)
    with pytest.raises(SurgeryError, match="Nothing was written"):
        es.save_patched(unpatched, out, converted.plan, model_kwargs=converted.model_kwargs)
    with pytest.raises(SurgeryError, match="model_kwargs=result.model_kwargs"):  # num_classes=7 not passed
        es.save_patched(converted.model, out, converted.plan)
    assert os.listdir(tmp_path) == []


def test_save_and_load_from_a_thread_twice_leaves_process_state(converted, tmp_path, monkeypatch):
    """Not in the main thread (no handlers may be set there), twice; relative paths after
    chdir, a Path subclass; then the handlers and umask are those of before."""

    class MyPath(type(Path())):
        pass

    monkeypatch.chdir(tmp_path)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), os.umask(0o027))
    errors = []

    def work():
        try:
            for name in ("a.safetensors", MyPath("b.safetensors")):
                es.save_patched(
                    converted.model, name, converted.plan, model_kwargs=converted.model_kwargs, force=True
                )
                es.load_patched(name)
            with pytest.raises(SurgeryError, match="already exists"):
                es.save_patched(
                    converted.model, "a.safetensors", converted.plan, model_kwargs={"num_classes": 7}
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        for _ in range(2):
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before[2])
    assert errors == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before[:2]
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]
    assert (os.stat("a.safetensors").st_mode & 0o777) == 0o640


@pytest.mark.parametrize("seed", [2**70, -(2**64), 1.5, "0", True])
def test_a_seed_torch_cannot_take_is_a_surgery_error(seed):
    with pytest.raises(SurgeryError, match="`seed` must be an integer"):
        es.convert("seresnet18", "se-to-eca", seed=seed, check=False, flops=False, timm_native=False)


def test_a_numpy_seed_is_taken():
    import numpy as np

    es.convert("seresnet18", "se-to-eca", seed=np.int64(3), check=False, flops=False, timm_native=False)


def test_heal_refuses_a_huge_seed_and_an_unreadable_input(tmp_path):
    from eca_surgery.healing import HealSettings, heal

    with pytest.raises(SurgeryError, match="`seed` must be an integer"):
        HealSettings(seed=2**64).check()
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    with pytest.raises(SurgeryError, match="File name too long"):
        heal(tmp_path / LONG, tmp_path / "img", tmp_path / "out.safetensors")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the kernel shows no umask in /proc")
def test_saving_never_sets_the_umask(converted, tmp_path, monkeypatch):
    """os.umask(0) to read the umask would give another thread's new files mode 0666 for
    that moment; where /proc shows the umask it is read from there."""
    from eca_surgery.outputs import current_umask

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        assert current_umask() == 0o027
        path = es.save_patched(
            converted.model, tmp_path / "m.safetensors", converted.plan, model_kwargs={"num_classes": 7}
        )
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.fixture(scope="module")
def saved(converted, tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("saved") / "p.safetensors"
    es.save_patched(converted.model, path, converted.plan, model_kwargs=converted.model_kwargs)
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


@pytest.mark.parametrize(
    "key, text",
    [
        ("model_kwargs", "[" * 100000 + "]" * 100000),
        ("recipe", '{"a":' * 100000 + "1" + "}" * 100000),
        ("model_kwargs", '{"num_classes": ' + "9" * 5000 + "}"),
        ("model_kwargs", '{"num_classes": 7, "num_classes": 1000}'),
        ("recipe", '{"version": 1, "version": 1}'),
        ("model_kwargs", "{" + ", ".join(f'"k{i}": 0' for i in range(100000)) + ', "k0": 1}'),
    ],
    ids=["deep-kwargs", "deep-recipe", "huge-int", "duplicate-kwarg", "duplicate-recipe-key", "many-keys"],
)
def test_damaged_metadata_json_is_a_surgery_error(saved, tmp_path, key, text):
    import time

    from safetensors.torch import save_file

    tensors, metadata = saved
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={**metadata, key: text})
    start = time.monotonic()
    with pytest.raises(SurgeryError, match="damaged eca-surgery metadata"):
        es.load_patched(path)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("value", ["[" * 100000, "[" * 100000 + "]" * 100000, "9" * 5000, '{"a": 1, "a": 2}'])
def test_cli_model_arg_json_that_python_cannot_read_is_an_error(tmp_path, value):
    from cli_helpers import run_fail

    assert "--model-arg" in run_fail(
        ["inspect", "seresnet18", "--model-arg", f"pretrained_cfg_overlay={value}"], tmp_path
    )


@pytest.mark.parametrize(
    "name, recipe, other",
    [("seresnet18", "se-to-eca", "resnet18"), ("resnet18", "eca-after-stages", "efficientnet_b0")],
)
def test_apply_plan_refuses_a_second_apply_and_another_model(name, recipe, other):
    """A second apply of an insert plan used to add a second hook silently: the model then
    ran two ECA blocks in a row, one of them not in its state_dict."""
    import timm

    model = timm.create_model(name, pretrained=False)
    plan = es.make_plan(model, es.load_recipe(recipe), name)
    es.apply_plan(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(SurgeryError, match="already applied"):
        es.apply_plan(model, plan)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(SurgeryError, match="made for another"):
        es.apply_plan(timm.create_model(other, pretrained=False), plan)
