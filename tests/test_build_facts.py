"""issue 14: what convert's meta-device work finds out about a build (the original's pass, the
timm-native candidates' shapes) is kept in the cache folder, so a later process converting the
same build runs neither again and gets the same answers; a damaged cache only costs time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import load_file, save_file
from spies import counting

import eca_surgery.checks as checks
import eca_surgery.native as native
from eca_surgery import convert
from eca_surgery.cache import cache_dir
from eca_surgery.facts import BuildFacts


def _new_process(monkeypatch) -> None:
    """Forget what this process learnt, as a new one would: only the cache folder is left."""
    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setattr(native, "_FAMILY", {})


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "src.safetensors"
    save_file(timm.create_model("seresnet18").state_dict(), str(path))
    return path


def _files() -> list[Path]:
    return sorted(cache_dir().glob("build-*.json"))


def _summary(result) -> tuple:
    return result.macs, result.native, result.check


def test_a_later_convert_of_the_same_build_runs_no_meta_pass_and_builds_no_candidate(
    tmp_path, monkeypatch, checkpoint
):
    first = convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "a.safetensors")
    assert len(_files()) == 1
    _new_process(monkeypatch)
    runs = counting(monkeypatch, checks, "run")
    builds = counting(monkeypatch, native, "create_model")
    second = convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "b.safetensors")
    assert [x.is_meta for _, x in runs] == [False]  # only the real finite check
    assert builds == [("seresnet18",)]  # only the matching candidate, which a cache file cannot vouch for
    assert _summary(second) == _summary(first)
    assert second.native == {"model": "seresnet18", "kwargs": {"block_args": {"attn_layer": "eca"}}}
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_another_build_of_the_same_model_has_facts_of_its_own(tmp_path, monkeypatch, checkpoint):
    convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "a.safetensors")
    _new_process(monkeypatch)
    runs = counting(monkeypatch, checks, "run")
    ten = convert("seresnet18", "se-to-eca", output=tmp_path / "b.safetensors", num_classes=10)
    assert [x.is_meta for _, x in runs] == [True, False] and len(_files()) == 2
    assert ten.check["output_shape_at_default_size"] == [1, 10]


def _damage(path: Path, how: str) -> None:
    body = json.loads(path.read_text())
    entries = body["entries"]
    if how == "garbage":
        path.write_bytes(b"\x00{not json")
    elif how == "truncated":
        path.write_text(path.read_text()[:200])
    else:
        if how == "wrong shape":
            entries["pass"]["shape"] = [1, -1000]
        elif how == "wrong macs":
            entries["pass"]["macs"] = "many"
        elif how == "wrong modules":
            entries["pass"]["modules"] = {"layer1.0.se": True}
        elif how == "wrong digest":
            for k in entries:
                if k.startswith("native:"):
                    entries[k] = "../../etc/passwd"
        elif how == "other key":
            body["key"]["timm"] = "0.0.1"
        path.write_text(json.dumps(body))


@pytest.mark.parametrize(
    "how", ["garbage", "truncated", "wrong shape", "wrong macs", "wrong modules", "wrong digest", "other key"]
)
def test_a_damaged_cache_is_recomputed_with_the_same_answers(tmp_path, monkeypatch, checkpoint, how):
    first = convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "a.safetensors")
    (path,) = _files()
    _damage(path, how)
    _new_process(monkeypatch)
    second = convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "b.safetensors")
    assert _summary(second) == _summary(first)
    assert BuildFacts.of("seresnet18", {}).meta_pass() is not None  # rewritten whole


def test_an_unwritable_cache_folder_leaves_convert_uncached(tmp_path, monkeypatch, checkpoint):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("ECA_SURGERY_CACHE", str(blocked / "cache"))
    first = convert("seresnet18", "se-to-eca", checkpoint=checkpoint, output=tmp_path / "a.safetensors")
    assert first.native is not None and first.macs["macs_before"] > 0
    assert BuildFacts.of("seresnet18", {}).meta_pass() is None


def test_kwargs_json_cannot_spell_leave_the_build_uncached():
    import torch

    assert BuildFacts.of("seresnet18", {"act_layer": torch.nn.ReLU}).file is None
    assert BuildFacts.of("seresnet18", {"drop_rate": float("nan")}).file is None


def test_a_second_cli_process_reads_the_facts_the_first_wrote(tmp_path, checkpoint):
    env = {**os.environ, "ECA_SURGERY_CACHE": str(tmp_path / "cache")}
    outputs = []
    for name in ("a", "b"):
        argv = [sys.executable, "-m", "eca_surgery", "convert", "seresnet18", "-r", "se-to-eca"]
        argv += ["-c", str(checkpoint), "-o", str(tmp_path / f"{name}.safetensors"), "--json"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert len(list((tmp_path / "cache").glob("build-timm-*.json"))) == 1
    for key in ("macs_before", "macs_after", "timm_native", "check"):
        assert outputs[0][key] == outputs[1][key] and outputs[0][key]


def test_a_candidate_this_process_built_before_reaches_a_new_cache_folder(tmp_path, monkeypatch):
    convert("seresnet18", "se-to-eca", dry_run=True)  # built and memoised in this process
    monkeypatch.setenv("ECA_SURGERY_CACHE", str(tmp_path / "other"))
    convert("seresnet18", "se-to-eca", dry_run=True)
    assert isinstance(BuildFacts.of("seresnet18", {}).native({"block_args": {"attn_layer": "eca"}}), str)


def test_a_candidate_with_kwargs_json_cannot_spell_is_built_once(monkeypatch):
    import torch

    from eca_surgery import find_native, make_plan
    from eca_surgery.apply import apply_plan
    from eca_surgery.models import create_model
    from eca_surgery.recipe import load_recipe

    kwargs = {"act_layer": torch.nn.ReLU}  # never memoised nor cached: an object
    plan = make_plan(create_model("seresnet18", meta=True, **kwargs), load_recipe("se-to-eca"), "seresnet18")
    patched = apply_plan(create_model("seresnet18", meta=True, **kwargs), plan)
    builds = counting(monkeypatch, native, "create_model")
    found = find_native("seresnet18", kwargs, patched, plan)
    assert found == {"model": "seresnet18", "kwargs": {**kwargs, "block_args": {"attn_layer": "eca"}}}
    assert len(builds) == 1
