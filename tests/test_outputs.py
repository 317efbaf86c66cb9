"""Outputs never damage a user's files: what may be replaced, modes, writability, atomicity,
temporaries and signals (issue 10, items 1-4, 13, 14, 21 and 25)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import listing, run_fail, run_ok, runner, text_of
from safetensors.torch import load_file

import eca_surgery.surgery as surgery
from eca_surgery.checkpoint import save_patched
from eca_surgery.cli import app
from eca_surgery.errors import SurgeryError
from eca_surgery.outputs import MARKER, TMP_TAG, atomic_write_dir, clean_leftovers
from eca_surgery.recipe import load_recipe

CONVERT = ["convert", "seresnet18", "-r", "se-to-eca"]


@pytest.fixture(scope="module")
def conversion():
    """seresnet18 converted (random weights), for saving in many ways."""
    return surgery.convert("seresnet18", load_recipe("se-to-eca"), check=False, flops=False)


@pytest.fixture
def no_real_work(monkeypatch):
    """Fail the test if convert builds a real model (anything but the meta-device plan)."""
    real = surgery.create_model

    def meta_only(name, meta=False, **kwargs):
        assert meta, "real work started before the output was checked"
        return real(name, meta=True, **kwargs)

    monkeypatch.setattr(surgery, "create_model", meta_only)


@pytest.fixture
def nothing_removed():
    """Fail the test if anything but one of the tool's own temporaries is removed, renamed
    or replaced: a refusal must not depend on a later check to save the user's files.
    The guards go at this fixture's teardown, before pytest removes the test's tmp_path."""
    import shutil

    def guard(real):
        def checked(path, *args, **kwargs):
            assert TMP_TAG in os.fspath(path), f"{real.__name__}({path!r}) on a user's path"
            return real(path, *args, **kwargs)

        return checked

    with pytest.MonkeyPatch.context() as patch:
        for name in ("unlink", "remove", "rmdir", "rename", "replace"):
            patch.setattr(os, name, guard(getattr(os, name)))
        patch.setattr(shutil, "rmtree", guard(shutil.rmtree))
        yield


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_TAG in p.name or p.name.endswith(".tmp"))


def _temporary_files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if (TMP_TAG in p.name or p.name.endswith(".tmp")) and p.is_file()]
    except FileNotFoundError:  # removed between listing and stat
        return []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def populate(folder: Path) -> dict[str, tuple[int, int]]:
    """A folder of a user's files (one in a subfolder); their listing."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.bin").write_bytes(b"\0" * 100)
    (folder / "home" / "work").mkdir(parents=True, exist_ok=True)
    (folder / "home" / "work" / "draft.txt").write_text("precious too")
    return listing(folder)


# 1. --timm-dir never replaces a user's folder


@pytest.mark.parametrize("where", [".", "..", "~", "unrelated", "/"])
def test_timm_dir_never_replaces_a_users_folder(tmp_path, monkeypatch, no_real_work, nothing_removed, where):
    work = tmp_path / "home" / "work"
    before = populate(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "sub" if where == "~" else work)  # home: not an ancestor of the cwd
    # the shell expands ~ before the tool sees it
    target = {"unrelated": str(tmp_path / "sub"), "~": str(tmp_path / "home")}.get(where, where)
    out = tmp_path / "out.safetensors"
    msg = run_fail([*CONVERT, "-o", str(out), "--timm-dir", target, "--force"], tmp_path, out)
    reason = {
        ".": "is the current directory",
        "..": "is an ancestor of the current directory",
        "~": "is the home directory",
        "unrelated": "is not an earlier export of eca-surgery",
        "/": "is the root folder",
    }[where]
    assert reason in msg and ("never replaced" in msg or "never replaces" in msg)
    assert listing(tmp_path) == before and work.is_dir()


def test_an_earlier_export_with_a_foreign_file_is_kept_whole(tmp_path, no_real_work):
    tdir = tmp_path / "export"
    tdir.mkdir()
    (tdir / MARKER).write_text(json.dumps({"format": "eca-surgery", "kind": "timm-dir", "files": ["a"]}))
    (tdir / "a").write_text("a")
    (tdir / "mine.txt").write_text("precious")
    msg = run_fail([*CONVERT, "--timm-dir", str(tdir), "--force"], tmp_path)
    assert "'mine.txt'" in msg and "left untouched" in msg


def test_a_folder_export_replaces_only_its_own_earlier_export(tmp_path):
    tdir = tmp_path / "export"

    def write(text):
        return lambda tmp: (tmp / "model.bin").write_text(text)

    atomic_write_dir(tdir, write("one"), False, "test")
    with pytest.raises(SurgeryError, match="already exists"):
        atomic_write_dir(tdir, write("two"), False, "test")
    with pytest.raises(SurgeryError, match="not an earlier export"):  # another kind of export
        atomic_write_dir(tdir, write("two"), True, "other")
    os.chmod(tdir / "model.bin", 0o600)
    atomic_write_dir(tdir, write("two"), True, "test")
    assert (tdir / "model.bin").read_text() == "two"
    assert stat.S_IMODE((tdir / "model.bin").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary, no old copy
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_write_dir(empty, write("x"), True, "test")  # an empty folder may be replaced
    assert sorted(os.listdir(empty)) == [MARKER, "model.bin"]


def test_a_failed_folder_export_leaves_the_old_one(tmp_path):
    tdir = tmp_path / "export"
    atomic_write_dir(tdir, lambda tmp: (tmp / "model.bin").write_text("one"), False, "test")

    def fail(tmp):
        (tmp / "model.bin").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SurgeryError, match="No space left on device"):
        atomic_write_dir(tdir, fail, True, "test")
    assert (tdir / "model.bin").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# 2. only regular files are replaced


def test_a_fifo_is_never_replaced(tmp_path, no_real_work):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    msg = run_fail([*CONVERT, "-o", str(fifo), "--force"], tmp_path)
    assert "FIFO" in msg and "only ever replaces regular files" in msg
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_is_never_replaced(tmp_path, no_real_work):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    msg = run_fail([*CONVERT, "-o", str(dev), "--force"], tmp_path)
    assert "character device" in msg
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and os.lstat(dev).st_rdev == os.makedev(1, 3)


def test_a_directory_is_not_an_output_file(tmp_path, no_real_work):
    (tmp_path / "d").mkdir()
    assert "is a directory" in run_fail([*CONVERT, "-o", str(tmp_path / "d"), "--force"], tmp_path)


# 3. the mode of a replaced file is kept


def test_a_private_file_stays_private(tmp_path, conversion):
    out = tmp_path / "private.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    save_patched(conversion.model, out, conversion.plan, force=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_size > 1000


def test_a_private_file_stays_private_through_the_cli(tmp_path):
    out = tmp_path / "private.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    run_ok([*CONVERT, "-o", str(out), "--force"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_size > 1000


# 4. a symbolic link counts as existing and is never replaced


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlink_is_never_replaced(tmp_path, no_real_work, force, dangling):
    target = tmp_path / "target.safetensors"
    if not dangling:
        target.write_bytes(b"precious")
    link = tmp_path / "out.safetensors"
    link.symlink_to(target)
    msg = run_fail([*CONVERT, "-o", str(link), *force], tmp_path)
    assert "symbolic link" in msg or "already exists" in msg
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.exists() != dangling and (dangling or target.read_bytes() == b"precious")


def test_a_symlinked_timm_dir_is_never_replaced(tmp_path, no_real_work):
    real = tmp_path / "real"
    populate(real)
    (tmp_path / "link").symlink_to(real)
    before = listing(real)
    msg = run_fail([*CONVERT, "--timm-dir", str(tmp_path / "link"), "--force"], tmp_path)
    assert "symbolic link" in msg
    assert listing(real) == before


# 13. outputs that cannot be written are refused before any work; write errors are clean


@pytest.mark.parametrize("path", ["/proc/eca-test.safetensors", "/sys/eca-test.safetensors"])
def test_virtual_filesystems_are_refused_before_any_work(tmp_path, no_real_work, path):
    msg = run_fail([*CONVERT, "-o", path], tmp_path)
    assert "Cannot write in folder" in msg and not Path(path).exists()
    assert "Cannot write in folder" in run_fail([*CONVERT, "--timm-dir", "/proc/eca-test-dir"], tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
@pytest.mark.parametrize("which", ["-o", "--timm-dir"])
def test_an_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch, no_real_work, code, which):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if TMP_TAG in str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    msg = run_fail([*CONVERT, which, str(tmp_path / "out")], tmp_path)
    assert f"Cannot write in folder '{tmp_path}'" in msg and os.strerror(code) in msg


def test_a_full_disk_is_refused_before_loading_weights(tmp_path, monkeypatch, no_real_work):
    import eca_surgery.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: _Usage(1000))
    out = tmp_path / "out.safetensors"
    msg = run_fail([*CONVERT, "-o", str(out)], tmp_path, out)
    assert "MB free" in msg and "needs about" in msg


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def _no_call(*args, **kwargs):
    raise AssertionError("real work started before the output was checked")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES])
def test_a_failed_write_names_the_path_and_reason(tmp_path, monkeypatch, conversion, code):
    import safetensors.torch

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SurgeryError, match=f"Could not write '{out}': {os.strerror(code)}"):
        save_patched(conversion.model, out, conversion.plan)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_errors_become_clean_errors(tmp_path, monkeypatch, conversion):
    import safetensors.torch
    from safetensors import SafetensorError

    def failing(tensors, filename, metadata=None):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(SurgeryError, match="No space left on device"):
        save_patched(conversion.model, tmp_path / "out.safetensors", conversion.plan)
    assert list(tmp_path.iterdir()) == []


def test_a_cli_write_error_is_one_paragraph(tmp_path, monkeypatch):
    import safetensors.torch

    def failing(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    out = tmp_path / "out.safetensors"
    msg = run_fail([*CONVERT, "-o", str(out)], tmp_path, out)
    assert "No space left on device" in msg and str(out) in msg


def test_heal_checks_its_outputs_before_any_work(tmp_path, monkeypatch):
    import eca_surgery.healing as heal

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
    monkeypatch.setattr(heal, "open_patched", _no_call)
    patched = tmp_path / "patched.safetensors"
    patched.write_bytes(b"x")
    for out in ("/proc/healed.safetensors", "/sys/healed.safetensors"):
        args = ["heal", str(patched), "--data", str(images), "-o", out, "--device", "cpu"]
        assert "Cannot write in folder" in run_fail(args, tmp_path)
    fifo = tmp_path / "healed.safetensors"
    os.mkfifo(fifo)
    args = ["heal", str(patched), "--data", str(images), "-o", str(fifo), "--device", "cpu", "--force"]
    assert "FIFO" in run_fail(args, tmp_path)
    fifo.unlink()
    (tmp_path / "healed.safetensors.heal-state.pt").symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in run_fail(args, tmp_path)


def test_heal_state_write_failure_leaves_no_temporary(tmp_path, monkeypatch, conversion):
    import eca_surgery.healing as heal
    from eca_surgery.checkpoint import CheckpointRecord, Patched

    out = tmp_path / "healed.safetensors"
    save_patched(conversion.model, out, conversion.plan)
    old = out.read_bytes()
    patched = Patched(conversion.model, CheckpointRecord.of(conversion.plan, {}), {})
    result = heal.HealResult(patched, heal.HealSettings(), 0, 1, losses=[1.0], history={})
    opt = torch.optim.AdamW(conversion.model.parameters())
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SurgeryError, match="No space left on device"):
        heal._save(result, out, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed.safetensors"]
    assert out.read_bytes() == old
    monkeypatch.setattr(torch, "save", real_save)
    heal._save(result, out, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "healed.safetensors",
        "healed.safetensors.heal-state.pt",
    ]
    assert torch.load(heal.state_path(out), weights_only=True)["step"] == 1


@pytest.mark.parametrize("failing", ["checkpoint write", "state fsync", "checkpoint fsync"])
def test_a_failed_heal_save_replaces_neither_file_and_leaves_no_temporary(
    tmp_path, monkeypatch, conversion, failing
):
    """Before: when the optimizer state's temporary failed after the checkpoint was renamed
    into place, the checkpoint was replaced (a step the state on disk did not match) while
    the error said nothing was replaced. Now both are renamed together, or neither."""
    import eca_surgery.checkpoint as checkpoint
    import eca_surgery.healing as heal
    import eca_surgery.outputs as outputs
    from eca_surgery.checkpoint import CheckpointRecord, Patched

    out = tmp_path / "healed.safetensors"
    patched = Patched(conversion.model, CheckpointRecord.of(conversion.plan, {}), {})
    result = heal.HealResult(patched, heal.HealSettings(), 0, 1, losses=[1.0], history={})
    opt = torch.optim.AdamW(conversion.model.parameters())
    heal._save(result, out, opt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result.step, real_fsync = 2, outputs._fsync

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync(path):
        target = "healed.safetensors.heal-state.pt" if failing == "state fsync" else "healed.safetensors"
        if f"{target}{TMP_TAG}" in path.name:
            full_disk()
        return real_fsync(path)

    if failing == "checkpoint write":
        monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    else:
        monkeypatch.setattr(outputs, "_fsync", fsync)
    with pytest.raises(SurgeryError, match="No space left on device"):
        heal._save(result, out, opt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_files_written_together_are_all_replaced_or_none(tmp_path):
    from eca_surgery.outputs import atomic_write_file, written_together

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")

    def fail(tmp):
        raise RuntimeError("the second write fails")

    with pytest.raises(RuntimeError), written_together():
        atomic_write_file(a, lambda tmp: tmp.write_text("new a"), True)
        assert a.read_text() == "old a"  # not renamed before the block ends
        atomic_write_file(b, fail, True)
    assert sorted(listing(tmp_path)) == ["a.txt"] and a.read_text() == "old a"
    with written_together():
        atomic_write_file(a, lambda tmp: tmp.write_text("new a"), True)
        atomic_write_file(b, lambda tmp: tmp.write_text("new b"), False)
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and sorted(listing(tmp_path)) == [
        "a.txt",
        "b.txt",
    ]


# 14. signals and leftovers of killed runs


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "eca_surgery", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_clean_end(proc: subprocess.Popen, stderr: str, out: Path) -> None:
    """Interrupted (143, with its message) or finished; no traceback, no temporary, and
    the output, if any, whole. -15: the signal came while the interpreter was shutting
    down (it restores the default handler then), after the output was written."""
    assert "Traceback" not in stderr
    assert proc.returncode in (0, 143, -signal.SIGTERM), stderr
    if proc.returncode == 143:
        assert "Terminated (SIGTERM)" in stderr
    else:
        assert out.exists()
    if out.exists():  # finished, or the signal came just after the rename: whole either way
        assert len(load_file(out)) > 100
    assert temporaries(out.parent) == []


def test_sigterm_while_writing_leaves_no_temporary(tmp_path):
    out = tmp_path / "out.safetensors"
    proc = _spawn(["convert", "seresnet50", "-r", "se-to-eca", "-o", str(out)], tmp_path)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.stat().st_size for p in _temporary_files(tmp_path)):  # the checkpoint, being written
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=120)
    _assert_clean_end(proc, stderr, out)


STALL = """
import sys, threading, time
import torch
import eca_surgery.outputs
import eca_surgery.surgery
from eca_surgery.cli import main

def stall(module, name, word):
    real = getattr(module, name)

    def stalled(*args, **kwargs):
        result = real(*args, **kwargs)
        sys.stderr.write(word + "\\n")
        sys.stderr.flush()
        time.sleep(60)
        return result

    setattr(module, name, stalled)

def slow_module(module, args):  # the check beside the writing, 0.5 s a module: about a minute
    if threading.current_thread().name == "eca-surgery-meanwhile":
        if not said:
            said.append(sys.stderr.write("STALLED\\n"))
            sys.stderr.flush()
        time.sleep(0.5)

said = []
if sys.argv[1] == "writing":  # the temporary is written in full and checked, not yet renamed
    stall(eca_surgery.outputs, "_ready", "STALLED")
else:  # the model is converted and being checked (only a stop at the next module ends it soon)
    torch.nn.modules.module.register_module_forward_pre_hook(slow_module)
sys.argv[1:2] = []
main()
"""


CHECK_STALL = """
import sys, time
from pathlib import Path
import eca_surgery.surgery
from eca_surgery.cli import main

real = eca_surgery.surgery.forward_check

def slow(model, x, stop=None):  # in the thread beside the writing, which ends long before it
    result = real(model, x, stop)
    sys.stderr.write("STALLED\\n")
    sys.stderr.flush()
    time.sleep(3)
    Path("check-ended").write_text("yes")
    return result

eca_surgery.surgery.forward_check = slow
main()
"""


def _stalled(tmp_path: Path, script: str, *args: str) -> subprocess.Popen:
    """``convert`` run by ``script`` (with ``args`` before the CLI's own), once it says STALLED."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-c", script, *args, *CONVERT, "-o", str(tmp_path / "out.safetensors")]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    seen = []
    while (line := proc.stderr.readline()) and "STALLED" not in line:
        seen.append(line)
    assert "STALLED" in line, "".join(seen)
    return proc


def test_a_signal_while_waiting_for_the_check_beside_the_writing_waits_for_it_and_exits_cleanly(tmp_path):
    proc = _stalled(tmp_path, CHECK_STALL)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Terminated" in stderr and "Traceback" not in stderr, stderr
    # the check was waited for (a thread cut off inside torch at exit may abort the process)
    assert sorted(os.listdir(tmp_path)) == ["check-ended"]


@pytest.mark.parametrize("phase", ["working", "writing"])
@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGTERM, 143, "Terminated"), (signal.SIGINT, 130, "Interrupted")]
)
def test_a_signal_at_a_known_point_exits_cleanly(tmp_path, phase, sig, code, said):
    proc = _stalled(tmp_path, STALL, phase)
    if phase == "writing":
        assert [p.stat().st_size > 1000 for p in _temporary_files(tmp_path)] == [True]
    proc.send_signal(sig)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and said in stderr and "Traceback" not in stderr, stderr
    assert sorted(os.listdir(tmp_path)) == []
    assert time.monotonic() - sent < 15  # a check that is running stops at its next module


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out, tdir = tmp_path / "out.safetensors", tmp_path / "timm"
    dead, alive = dead_pid(), os.getppid()
    stale = [
        tmp_path / f".out.safetensors{TMP_TAG}{dead}-0123abcd",
        tmp_path / f".timm{TMP_TAG}{dead}-89abcdef",
    ]
    stale[0].write_bytes(b"\0" * 1000)
    stale[1].mkdir()
    (stale[1] / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.safetensors{TMP_TAG}{alive}-0123abcd"
    live.write_bytes(b"busy")
    other = tmp_path / f".other.safetensors{TMP_TAG}{dead}-0123abcd"
    other.write_bytes(b"not ours to judge")
    result = runner.invoke(app, [*CONVERT, "-o", str(out), "--timm-dir", str(tdir)])
    assert result.exit_code == 0, text_of(result)
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert result.stderr.count("left by an interrupted run") == 2


def test_clean_leftovers_takes_only_dead_temporaries_of_that_name(tmp_path):
    dead = dead_pid()
    names = [
        f".a{TMP_TAG}{dead}-00ff",
        f".a{TMP_TAG}{os.getpid()}-00ff",
        f".ab{TMP_TAG}{dead}-00ff",
        f"a{TMP_TAG}{dead}-00ff",
        f".a{TMP_TAG}{dead}-00ff.keep",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert clean_leftovers(tmp_path, "a") == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


# 21. --timm-dir is refused before any work, with the real reason


def _per_stage_recipe(tmp_path: Path, kernels=(3, 5, 5, 7), gate="sigmoid") -> Path:
    rules = [
        {
            "action": "replace",
            "select": {"path": f"layer{i + 1}.*.se"},
            "eca": {"kernel_size": k, "gate": gate},
        }
        for i, k in enumerate(kernels)
    ]
    path = tmp_path / "per-stage.yaml"
    path.write_text(json.dumps({"version": 1, "rules": rules}))
    return path


def test_timm_dir_with_fixed_kernels_is_refused_before_any_work(tmp_path, no_real_work):
    recipe = _per_stage_recipe(tmp_path)
    out = tmp_path / "out.safetensors"
    args = ["convert", "seresnet18", "-r", str(recipe), "-o", str(out), "--timm-dir", str(tmp_path / "t")]
    msg = run_fail(args, tmp_path, out)
    assert "'layer4.0.se' (512 channels) has kernel size 7 where timm would use 5" in msg
    assert "adaptive kernel size" in msg


def test_timm_dir_with_other_gates_is_refused_before_any_work(tmp_path, no_real_work):
    recipe = _per_stage_recipe(tmp_path, kernels=(3, 5, 5, 5), gate="hard_sigmoid")
    msg = run_fail(["convert", "seresnet18", "-r", str(recipe), "--timm-dir", str(tmp_path / "t")], tmp_path)
    assert "'layer1.0.se' has a hard_sigmoid gate" in msg


def test_timm_dir_of_a_family_timm_cannot_build_is_refused_before_any_work(tmp_path, no_real_work):
    msg = run_fail(["convert", "regnety_002", "-r", "se-to-eca", "--timm-dir", str(tmp_path / "d")], tmp_path)
    assert "timm cannot build this ECA variant" in msg


def test_the_api_refuses_a_non_native_plan_when_asked(tmp_path):
    with pytest.raises(SurgeryError, match="kernel size 7 where timm would use 5"):
        surgery.convert("seresnet18", load_recipe(_per_stage_recipe(tmp_path)), timm_dir=tmp_path / "t")
    assert (
        surgery.convert("seresnet18", load_recipe(_per_stage_recipe(tmp_path)), dry_run=True).native is None
    )


# 25. the write is atomic: a failure half-way leaves the old file bit for bit


def test_a_failed_overwrite_leaves_the_old_file_bit_identical(tmp_path, monkeypatch, conversion):
    import safetensors.torch

    out = tmp_path / "model.safetensors"
    save_patched(conversion.model, out, conversion.plan)
    old, mode = out.read_bytes(), out.stat().st_mode
    real = safetensors.torch.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the disk fills up half-way through
            f.truncate(len(old) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(SurgeryError, match="No space left on device"):
        save_patched(conversion.model, out, conversion.plan, force=True)
    assert out.read_bytes() == old and out.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_users_folder_is_not_offered_to_force(tmp_path, no_real_work):
    before = populate(tmp_path / "mine")
    msg = run_fail([*CONVERT, "--timm-dir", str(tmp_path / "mine")], tmp_path)
    assert "not an earlier export" in msg and "--force" not in msg
    assert listing(tmp_path / "mine") == before


def test_odd_paths_give_clean_errors(tmp_path, no_real_work):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "file").write_text("x")
    for args, expected in [
        (["--timm-dir", str(tmp_path / "loop1"), "--force"], "cannot be resolved"),
        (["-o", str(tmp_path / "loop1"), "--force"], "symbolic link"),
        (["-o", str(tmp_path / "file" / "x.safetensors")], "does not exist"),
        (["--timm-dir", str(tmp_path / "file"), "--force"], "not a folder"),
    ]:
        assert expected in run_fail([*CONVERT, *args], tmp_path)


def test_a_long_output_name_gets_a_temporary_that_fits(tmp_path):
    from eca_surgery.outputs import atomic_write_file

    out = tmp_path / ("a" * 250)
    atomic_write_file(out, lambda tmp: tmp.write_text("ok"), False)
    assert out.read_text() == "ok" and sorted(os.listdir(tmp_path)) == [out.name]


def test_a_full_disk_while_exporting_the_timm_dir_is_clean(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    msg = run_fail([*CONVERT, "--timm-dir", str(tmp_path / "export")], tmp_path)
    assert f"Could not write '{tmp_path / 'export'}': No space left on device" in msg


@pytest.mark.parametrize("command", ["convert", "heal"])
def test_an_output_ending_with_a_slash_names_a_folder(tmp_path, no_real_work, command):
    """`-o sub/` means a folder; the tool must not write a file called `sub` instead."""
    target = f"{tmp_path / 'sub'}/"
    args = (
        [*CONVERT, "-o", target]
        if command == "convert"
        else ["heal", str(tmp_path / "p.safetensors"), "--data", str(tmp_path), "-o", target]
    )
    msg = run_fail(args, tmp_path)
    assert "ends with a slash" in msg and "sub/model.safetensors" in msg
    assert not (tmp_path / "sub").exists()
