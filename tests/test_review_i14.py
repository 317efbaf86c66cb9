"""A hostile review of issue 14's speed work: the scan cache, the worker pool, the scan's
options and the header-only safetensors reader, each fixed finding pinned by a test."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
from cli_helpers import runner

from eca_surgery.cache import CacheFile, cache_dir, cache_key
from eca_surgery.cli import app
from eca_surgery.errors import SurgeryError
from eca_surgery.scan import WORKER_PRELOAD, scan
from eca_surgery.workers import MAX_WAIT, WorkerPool


def _in_thread(fn, seconds: float = 5.0):
    """``fn()``'s result, or a failure where it does not return within ``seconds``."""
    box: list = []

    def target() -> None:
        try:
            box.append((fn(), None))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            box.append((None, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} hung"
    result, error = box[0]
    if error is not None:
        raise error
    return result


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_a_cache_file_never_hangs_the_scan():
    key = cache_key("timm", "scan", True)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fifo = CacheFile.open(folder, key, refresh=True).path
    os.mkfifo(fifo)
    cache = _in_thread(lambda: CacheFile.open(folder, key))
    assert cache.entries == {}
    cache.put("m", {})
    assert cache.save() is None and fifo.is_file()  # the FIFO is replaced by the real file


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_a_link_to_a_device_named_like_a_cache_file_is_not_read():
    key = cache_key("timm", "names")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = CacheFile.open(folder, key, refresh=True).path
    path.symlink_to("/dev/zero")
    assert _in_thread(lambda: CacheFile.open(folder, key)).entries == {}


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
def test_a_huge_timeout_never_reaches_select(timeout):
    """``--timeout 1e300`` (or inf) was an OverflowError traceback out of ``wait``."""
    pool = WorkerPool(str, 2, timeout, WORKER_PRELOAD)
    assert pool._wait_time() == MAX_WAIT


@pytest.mark.parametrize(
    "kwargs, word",
    [({"jobs": 0}, "`jobs`"), ({"jobs": 10_000}, "`jobs`"), ({"jobs": 2.5}, "`jobs`")]
    + [({"jobs": 2, "timeout": t}, "`timeout`") for t in (0, -1, float("nan"), "5")],
)
def test_scan_rejects_jobs_and_timeouts_no_pool_runs_with(kwargs, word):
    with pytest.raises(SurgeryError, match=word):
        scan(["resnet18"], **kwargs)


@pytest.mark.parametrize("args", [["--jobs", "10000"], ["--timeout", "nan"], ["--timeout", "0"]])
def test_cli_scan_jobs_and_timeout_out_of_range_are_usage_errors(args):
    result = runner.invoke(app, ["scan", "seresnet18", *args])
    assert result.exit_code == 2, result.output


def _safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE_HEADERS = {
    "huge length": (json.dumps({"a": _entry()}).encode(), b"\0" * 8, 2**64 - 1),
    "zero length": (b"{}", b"", 0),
    "not JSON": (b"hello", b"", None),
    "duplicate key": (b'{"a":1,"a":2}', b"", None),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, b"", None),
    "overlapping": (json.dumps({"a": _entry(), "b": _entry(offsets=(4, 12))}).encode(), b"\0" * 12, None),
    "beyond the file": (json.dumps({"a": _entry(offsets=(100, 108))}).encode(), b"\0" * 8, None),
    "unknown dtype": (json.dumps({"a": _entry(dtype="F128")}).encode(), b"\0" * 8, None),
    "unhashable dtype": (json.dumps({"a": _entry(dtype=["F32"])}).encode(), b"\0" * 8, None),
    "negative dim": (json.dumps({"a": _entry(shape=(-2,))}).encode(), b"\0" * 8, None),
    "huge product": (json.dumps({"a": _entry(shape=(2**40,) * 3)}).encode(), b"\0" * 8, None),
    "dim past int64": (json.dumps({"a": _entry(shape=(2**70,))}).encode(), b"\0" * 8, None),
    "million dims": (json.dumps({"a": _entry(shape=(2,) * 1_000_000)}).encode(), b"\0" * 8, None),
    "NaN dim": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', b"\0" * 8, None),
    "entry not a dict": (b'{"a":"x"}', b"", None),
    "entry missing keys": (b'{"a":{"dtype":"F32"}}', b"", None),
    "three offsets": (json.dumps({"a": _entry(offsets=(0, 8, 9))}).encode(), b"\0" * 8, None),
    "metadata not strings": (json.dumps({"__metadata__": {"x": 1}, "a": _entry()}).encode(), b"\0" * 8, None),
    "metadata a list": (json.dumps({"__metadata__": [1], "a": _entry()}).encode(), b"\0" * 8, None),
    "not UTF-8": (b'{"\xff":1}', b"", None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_are_one_clean_error(tmp_path, case):
    """Each is a CheckpointError of one paragraph naming the file, as the full read gives;
    messages name what is wrong (no bare ``KeyError: 'F128'``), and nothing takes long."""
    from eca_surgery.errors import CheckpointError
    from eca_surgery.weights import read_safetensors, read_safetensors_header

    path = _safetensors(tmp_path / "bad.safetensors", *HOSTILE_HEADERS[case])
    with pytest.raises(CheckpointError) as header_error:
        _in_thread(lambda: read_safetensors_header(path), 5.0)
    text = str(header_error.value)
    assert "bad.safetensors" in text and "\n" not in text and len(text) < 400
    assert not any(
        bare in text
        for bare in ("('F128')", "('shape')", "unhashable", "subscriptable", "unpack", "Overflow")
    )
    with pytest.raises(CheckpointError):  # the full read refuses it too: a dry run agrees with a real run
        read_safetensors(path)


def test_an_empty_safetensors_file_reads_as_the_full_read_does(tmp_path):
    from safetensors.torch import save_file

    from eca_surgery.weights import read_safetensors, read_safetensors_header

    save_file({}, tmp_path / "empty.safetensors")
    assert read_safetensors_header(tmp_path / "empty.safetensors") == {}
    assert read_safetensors(tmp_path / "empty.safetensors")[0] == {}


def _scan_file() -> Path:
    (path,) = cache_dir().glob("scan-*.json")
    return path


def test_markup_in_a_tampered_cache_never_reaches_the_table():
    """A cached row whose class names hold rich markup was a MarkupError traceback; such a
    row (and a model list of names no source has) is not ours: it is rebuilt."""
    from cli_helpers import run_ok

    run_ok(["scan", "seresnet18", "--jobs", "1"])
    data = json.loads(_scan_file().read_text())
    data["entries"]["seresnet18"]["row"]["se_blocks"] = {"[/bogus]": 8}
    _scan_file().write_text(json.dumps(data))
    (names_file,) = cache_dir().glob("names-*.json")
    names = json.loads(names_file.read_text())
    names["entries"]["seresnet18"] = ["[/bogus]"]
    names_file.write_text(json.dumps(names))
    out = run_ok(["scan", "seresnet18", "--jobs", "1"])
    assert "8xSEModule" in out and "bogus" not in out


def test_two_scans_saving_at_once_keep_each_others_rows():
    key = cache_key("timm", "scan", False)
    first, second = CacheFile.open(cache_dir(), key), CacheFile.open(cache_dir(), key)
    first.put("a", {})
    second.put("b", {})
    assert first.save() is None and second.save() is None
    assert set(CacheFile.open(cache_dir(), key).entries) == {"a", "b"}


def test_refresh_of_some_models_keeps_the_others_and_drops_a_crash():
    """``scan 'seres*' --refresh`` wiped every other model's row (the next whole-zoo scan
    started over); a model that now crashes loses its old row."""
    from eca_surgery.scan import Outcome, OutcomeCache

    old = OutcomeCache(flops=False)
    for name in ("kept", "rescanned", "crashes"):
        old.put(name, Outcome())
    old.save()
    new = OutcomeCache(flops=False, refresh=True)
    assert new.lookup(["rescanned", "crashes"]) == {}
    new.put("rescanned", Outcome(failure="now fails"))
    new.put("crashes", Outcome(failure="crashed", lasting=False))
    new.save()
    found = OutcomeCache(flops=False).lookup(["kept", "rescanned", "crashes"])
    assert found == {"kept": Outcome(), "rescanned": Outcome(failure="now fails")}
