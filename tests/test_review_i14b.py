"""Review of issue 14's build-facts cache and the write/check overlap, as a hostile user and a
hostile cache file would attack them. A cache file is anyone's to write: well-formed but wrong
facts may change reported figures (MACs, the output shape at the default size) or hide the
timm-native variant, but never name kwargs timm would not build, never break a report, and a
``timm_dir`` export is always checked against real builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open
from spies import counting

import eca_surgery.cache as cache
import eca_surgery.native as native
from eca_surgery import convert
from eca_surgery.cache import CacheFile, cache_dir
from eca_surgery.checks import MetaPass
from eca_surgery.facts import BuildFacts

EFFICIENT = "efficientnet_b0"


def _new_process(monkeypatch) -> None:
    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setattr(native, "_FAMILY", {})


def _native_entries(name: str) -> dict[str, object]:
    return {k: v for k, v in BuildFacts.of(name, {}).file.entries.items() if k.startswith("native:")}


def test_a_cached_digest_never_puts_kwargs_timm_cannot_build_in_a_checkpoint(tmp_path, monkeypatch):
    """The right candidate forged as unbuildable, a wrong one forged as matching: the written
    checkpoint's ``timm_native`` is not the wrong one (it may be missing), and the cache is corrected."""
    first = convert(EFFICIENT, "se-to-eca", dry_run=True)
    assert first.native == {"model": EFFICIENT, "kwargs": {"se_layer": "eca"}}
    target = BuildFacts.of(EFFICIENT, {}).native({"se_layer": "eca"})
    facts = BuildFacts.of(EFFICIENT, {})
    facts.remember_native({"se_layer": "eca"}, None)
    facts.remember_native({"attn": "eca"}, target)
    _new_process(monkeypatch)
    out = tmp_path / "m.safetensors"
    second = convert(EFFICIENT, "se-to-eca", output=out)
    assert second.native is None  # hidden by the forged negative, never the forged positive
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["timm_native"]) is None
    assert BuildFacts.of(EFFICIENT, {}).native({"attn": "eca"}) is None  # corrected by a real build


def test_a_timm_dir_export_is_checked_against_real_builds_whatever_the_cache_says(tmp_path, monkeypatch):
    convert(EFFICIENT, "se-to-eca", dry_run=True)
    facts = BuildFacts.of(EFFICIENT, {})
    for candidate in _native_entries(EFFICIENT):
        facts.remember_native(json.loads(candidate.removeprefix("native:")), None)
    _new_process(monkeypatch)
    result = convert(EFFICIENT, "se-to-eca", timm_dir=tmp_path / "dir")
    assert result.native == {"model": EFFICIENT, "kwargs": {"se_layer": "eca"}}
    assert json.loads((tmp_path / "dir" / "config.json").read_text())["model_args"]["se_layer"] == "eca"


def _forge_pass(macs: int, modules: dict[str, int]) -> None:
    BuildFacts.of("seresnet18", {}).remember_pass(MetaPass([1, 1000], macs, None, "", modules))


@pytest.mark.parametrize(
    "macs, modules",
    [(10**400, {}), (100, {"layer1.0.se": 101}), (2**62, {})],
    ids=["too many MACs for a float", "a module above the whole", "at the cap"],
)
def test_a_pass_no_model_can_have_reads_as_unknown(macs, modules):
    _forge_pass(macs, modules)
    assert BuildFacts.of("seresnet18", {}).meta_pass() is None


def test_forged_module_macs_above_the_whole_never_give_negative_macs(tmp_path):
    """Each SE block's MACs below the total, their sum above it: the patched model is counted."""
    modules = {f"layer{i}.{j}.se": 1000 for i in range(1, 5) for j in range(2)}
    _forge_pass(1000, modules)
    result = convert("seresnet18", "se-to-eca", output=tmp_path / "m.safetensors")
    assert result.macs["macs_before"] == 1000 and result.macs["macs_after"] > 10**8


def test_the_cli_reports_a_forged_pass_without_a_traceback(tmp_path):
    """What a well-formed but wrong pass changes: the figures reported, nothing else."""
    env = {**os.environ, "ECA_SURGERY_CACHE": str(cache_dir())}
    _forge_pass(10**400, {})  # a report divides MACs as floats: OverflowError
    argv = [sys.executable, "-m", "eca_surgery", "convert", "seresnet18", "-r", "se-to-eca"]
    argv += ["-o", str(tmp_path / "m.safetensors")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_an_interrupted_cache_write_leaves_no_temporary(monkeypatch):
    file = CacheFile.open(cache_dir(), cache.cache_key("timm", "build", model="x"))
    file.put("a", 1)

    def interrupted(self, *args, **kwargs):
        Path.write_bytes(self, b"{")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        file.save()
    assert list(cache_dir().iterdir()) == []


def test_facts_of_other_versions_are_not_used(monkeypatch):
    _forge_pass(1000, {})
    assert BuildFacts.of("seresnet18", {}).meta_pass() is not None
    real = cache._version
    monkeypatch.setattr(cache, "_version", lambda p: "9.9" if p == "timm" else real(p))
    assert BuildFacts.of("seresnet18", {}).meta_pass() is None


def test_kwargs_that_differ_only_in_int_float_or_bool_are_other_builds():
    facts = [BuildFacts.of("seresnet18", {"num_classes": v}) for v in (1, 1.0, True)]
    assert len({f.file.path for f in facts}) == 3
    facts[0].remember_native({"x": 1}, "0" * 64)
    assert facts[0].native({"x": 1.0}) is native.UNKNOWN and facts[0].native({"x": True}) is native.UNKNOWN


def test_kwargs_objects_of_the_same_repr_share_no_digest(monkeypatch):
    class Layer:
        def __init__(self, channels: int) -> None:
            self.channels = channels

        def __repr__(self) -> str:
            return "Layer"

    monkeypatch.setattr(native, "_shapes", lambda model: {"x": (1,)})
    monkeypatch.setattr(native, "create_model", lambda *a, **k: None)
    builds = counting(monkeypatch, native, "create_model")
    for layer in (Layer(1), Layer(2)):
        native._built_digest("seresnet18", {"act": layer}, BuildFacts(None))
    assert len(builds) == 2


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_cache_file_that_is_no_regular_file_reads_as_unknown_without_hanging(kind):
    path = BuildFacts.of("seresnet18", {}).file.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    assert BuildFacts.of("seresnet18", {}).meta_pass() is None
    _forge_pass(1000, {})  # and writing over it is harmless


def test_two_cli_converts_of_one_build_at_once_share_the_cache(tmp_path):
    env = {**os.environ, "ECA_SURGERY_CACHE": str(tmp_path / "cache")}
    runs = []
    for name in ("a", "b"):
        argv = [sys.executable, "-m", "eca_surgery", "convert", "seresnet18", "-r", "se-to-eca"]
        argv += ["-o", str(tmp_path / f"{name}.safetensors"), "--json"]
        runs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and "Traceback" not in err, err
    (only,) = (tmp_path / "cache").iterdir()  # no temporary left
    body = json.loads(only.read_text())
    assert "pass" in body["entries"] and any(k.startswith("native:") for k in body["entries"])


def test_converts_in_worker_threads_at_once_write_checked_outputs(tmp_path):
    """Signals never reach a worker thread; the check still runs beside the write, in two at once."""

    def one(name: str):
        return convert("seresnet18", "se-to-eca", output=tmp_path / f"{name}.safetensors")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, ["a", "b"]))
    assert all(r.check and r.check["finite"] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert threading.active_count() == 1 or not any(
        t.name == "eca-surgery-meanwhile" for t in threading.enumerate()
    )


def test_a_write_over_the_file_size_limit_is_a_clean_error_and_keeps_the_old_output(tmp_path):
    """safetensors spells the OS error as ``(os error 27)``: it is an OSError like any other."""
    import resource

    out = tmp_path / "m.safetensors"
    out.write_text("old")
    env = {**os.environ, "ECA_SURGERY_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "eca_surgery", "convert", "seresnet18", "-r", "se-to-eca", "-o", str(out)]
    limit = (1 << 20, resource.RLIM_INFINITY)
    done = subprocess.run(
        [*argv, "--force"], env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit),
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "File too large" in done.stderr and out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.safetensors"]


def test_a_dtype_or_fit_se_convert_reads_the_same_facts_as_a_plain_one(tmp_path, monkeypatch):
    plain = convert("seresnet18", "se-to-eca", output=tmp_path / "a.safetensors")
    _new_process(monkeypatch)
    half = convert("seresnet18", "se-to-eca", output=tmp_path / "b.safetensors", dtype="bfloat16")
    fit = convert("seresnet18", "se-to-eca", dry_run=False, init="fit-se", calib_size=2)
    assert plain.macs == half.macs == fit.macs and plain.native == half.native == fit.native
    assert half.check["dtype"] == "bfloat16" and half.check["finite"]
