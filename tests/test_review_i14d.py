"""Last hostile review of issue 14: the header-only safetensors reader fuzzed against the full
read (a dry run must agree with a real run), ``scan`` stopped by signals as a user stops it,
and ``convert`` writing into a filesystem that fills up as it writes."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eca_surgery.errors import CheckpointError
from eca_surgery.weights import read_safetensors, read_safetensors_header

# ---- the header reader, against the full read ------------------------------------------------

_DIMS = st.one_of(st.integers(0, 3), st.integers(-1, 2**65), st.booleans(), st.floats(), st.none())
_DTYPES = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F128", "f32"]), st.integers()
)
_ENTRY = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": _DTYPES,
            "shape": st.one_of(st.lists(_DIMS, max_size=3), _DIMS),
            "data_offsets": st.lists(st.one_of(st.integers(-1, 40), st.integers(0, 2**65)), max_size=3),
        }
    ),
    st.integers(),
    st.text(max_size=2),
)
_METADATA = st.one_of(
    st.just("absent"),
    st.none(),
    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers())),
    st.lists(st.none()),
)


def _shapes(read, path: Path) -> tuple[str, object]:
    """What ``read(path)`` gives: the dtypes and shapes, or (for a CheckpointError) "refused"."""
    try:
        tensors = read(path)
    except CheckpointError as exc:
        text = str(exc)
        assert "\n" not in text and len(text) < 600, text  # one paragraph
        return "refused", None
    return "read", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def _agree(path: Path) -> None:
    """The header reader refuses what the full read refuses, and reads what it reads, alike."""
    started = time.monotonic()
    header = _shapes(read_safetensors_header, path)
    assert time.monotonic() - started < 2.0
    assert header == _shapes(lambda p: read_safetensors(p)[0], path)


@settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    entries=st.dictionaries(st.text(max_size=3), _ENTRY, max_size=3),
    metadata=_METADATA,
    data=st.integers(0, 40),
    length=st.sampled_from([None, 0, 1, 7, 2**64 - 1, "one short", "one past"]),
)
def test_fuzzed_headers_read_as_the_full_read_does(tmp_path_factory, entries, metadata, data, length):
    """Random entries, metadata, data sizes and claimed header lengths (0, huge, one short,
    one past the file): each a clean CheckpointError or the same shapes as ``safe_open``."""
    body = json.dumps(entries if metadata == "absent" else {**entries, "__metadata__": metadata}).encode()
    claimed = {None: len(body), "one short": len(body) - 1, "one past": len(body) + 1}.get(length, length)
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", max(claimed, 0)) + body + b"\0" * data)
    _agree(path)


def _file(path: Path, body: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    "body, data",
    [
        # safetensors reads a null __metadata__ as none: the dry run refused the file a real run reads
        (b'{"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        # a lone surrogate is no UTF-8: the real run refused the file the dry run read
        (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        (b'{"__metadata__":{"\\udfff":"x"}}', b""),
        (b'{"__metadata__":[]}', b""),
        (b'{"__metadata__":false}', b""),
    ],
    ids=["null metadata", "surrogate name", "surrogate metadata", "metadata an empty list", "metadata false"],
)
def test_headers_the_dry_run_and_the_real_run_disagreed_on(tmp_path, body, data):
    _agree(_file(tmp_path / "m.safetensors", body, data))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_checkpoint_is_not_a_regular_file_and_is_never_opened(tmp_path):
    """It was "does not exist; check the path", of a path that does exist."""
    os.mkfifo(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_safetensors_header(tmp_path / "m.safetensors")


# ---- scan, stopped by signals ------------------------------------------------------------------


def _stat(pid: int | str) -> tuple[str, int] | None:
    """Process ``pid``'s state letter and parent, from /proc (None: gone, or no process)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        return state, int(ppid)
    except (OSError, ValueError, IndexError):
        return None


def _live_children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name)
        if stat is not None and stat[1] == pid and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def _scan(
    cache: Path, stop: tuple[signal.Signals, float, bool] | None = None
) -> tuple[int, str, str, set[int]]:
    """``scan 'seresnet*' --jobs 2 --json`` in a process of its own; with ``stop``, the signal
    sent after that many seconds (to the whole process group, as Ctrl-C in a terminal sends it,
    or to the process alone). Its exit code, stdout, stderr and every process it started."""
    argv = [sys.executable, "-m", "eca_surgery", "scan", "seresnet*", "--jobs", "2", "--json"]
    env = {**os.environ, "ECA_SURGERY_CACHE": str(cache)}
    run = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    seen: set[int] = set()
    if stop is not None:
        sig, delay, group = stop
        until = time.monotonic() + delay
        while time.monotonic() < until and run.poll() is None:
            seen.update(c for child in _live_children(run.pid) for c in (child, *_live_children(child)))
            time.sleep(0.02)
        if run.poll() is None:
            os.killpg(run.pid, sig) if group else run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    return run.returncode, out, err, seen


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_scan_stopped_by_signals_at_random_moments_leaves_nothing_behind(tmp_path):
    """Ctrl-C to the process group while the workers' fork server imported timm printed a
    KeyboardInterrupt traceback from the server below the scan's own one-line message.
    Each stop: the shell's code for the signal, no traceback, no process left, no temporary;
    and a later scan's output is that of an undisturbed one."""
    rng = random.Random(14)
    cache = tmp_path / "cache"
    for sig, group in ((signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGINT, True)):
        code, _, err, seen = _scan(cache, (sig, rng.uniform(0.6, 2.5), group))
        assert code in (0, 128 + sig, -sig), err  # 0: it finished first; -sig: stopped as Python exited
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        time.sleep(0.3)
        assert not [pid for pid in seen if _alive(pid)], "a worker or the fork server outlived the scan"
        assert not [p.name for p in cache.glob("*") if ".eca-surgery-tmp-" in p.name]
    code, after, err, _ = _scan(cache)
    assert code == 0, err
    code, undisturbed, err, _ = _scan(tmp_path / "fresh")
    assert code == 0 and json.loads(after) == json.loads(undisturbed)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


# ---- convert, into a filesystem that fills up ---------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of its own (unmounted afterwards); skipped where mounting is not permitted."""
    folder = tmp_path / "fs"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_filesystem_that_fills_up_mid_write_is_one_clean_error(small_tmpfs, tmp_path):
    """Room for the tensors (the check before writing passes) but not for the whole file:
    the write fails with ENOSPC partway. One clean error naming the path and the reason, exit
    code 1 at once (the check thread beside the write stopped: no abort), no temporary, and the
    old output at that path untouched."""
    from eca_surgery import convert

    out = small_tmpfs / "m.safetensors"
    convert("seresnet18", "se-to-eca", output=out, check=False, flops=False)
    old, size = out.read_bytes(), out.stat().st_size
    used = os.statvfs(small_tmpfs)
    taken = (used.f_blocks - used.f_bfree) * used.f_frsize
    room = taken + size - 4096  # a page short of a second copy, yet more than its tensors need
    subprocess.run(["mount", "-o", f"remount,size={room}", str(small_tmpfs)], check=True)
    argv = [sys.executable, "-m", "eca_surgery", "convert", "seresnet18", "-r", "se-to-eca"]
    argv += ["-o", str(out), "--force"]
    env = {**os.environ, "ECA_SURGERY_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "FATAL" not in done.stderr, done.stderr
    text = " ".join(done.stderr.split())
    assert str(out) in text and "No space left on device" in text and "Nothing was replaced" in text, text
    assert out.read_bytes() == old and sorted(p.name for p in small_tmpfs.iterdir()) == ["m.safetensors"]
    assert time.monotonic() - started < 120
