"""Final review of issue 14's timm-native search (the in-process memo, the per-class first guess,
the cache that only rules candidates out) as a hostile caller, cache file and test order would
attack it: whatever the memo, the guess or the cache folder say, the recorded ``timm_native`` is
what timm really builds, and a caller's objects changed after ``convert`` change no record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models.efficientnet import EfficientNet

import eca_surgery.native as native
from eca_surgery import convert, load_patched
from eca_surgery.facts import BuildFacts, spelled

EFFICIENT = "efficientnet_b0"
SE_LAYER = {"model": EFFICIENT, "kwargs": {"se_layer": "eca"}}


@pytest.fixture
def new_process(monkeypatch) -> None:
    """Forget what this process learnt, as a new one would: only the cache folder is left."""
    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setattr(native, "_FAMILY", {})


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _timm_builds_it(result) -> bool:
    """Whether plain timm, given the recorded native kwargs, builds the converted model's key -> shape map."""
    with torch.device("meta"):
        built = timm.create_model(result.native["model"], **result.native["kwargs"])
    return _shapes(built) == _shapes(result.model)


def test_a_list_the_caller_changes_after_convert_changes_no_record(tmp_path, new_process):
    indices = [1, 2]
    result = convert(
        EFFICIENT, "se-to-eca", check=False, flops=False, features_only=True, out_indices=indices
    )
    indices.append(4)  # the caller's own list, reused
    assert result.model_kwargs["out_indices"] == result.native["kwargs"]["out_indices"] == [1, 2]
    with safe_open(str(result.save(tmp_path / "m.safetensors")), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["timm_native"])["kwargs"]["out_indices"] == [1, 2]
    assert load_patched(tmp_path / "m.safetensors").feature_info.out_indices == (1, 2)


def test_find_native_gives_kwargs_of_its_own(new_process):
    from eca_surgery import find_native, make_plan
    from eca_surgery.apply import apply_plan
    from eca_surgery.models import create_model
    from eca_surgery.recipe import load_recipe

    kwargs = {"features_only": True, "out_indices": [1, 2]}
    plan = make_plan(create_model(EFFICIENT, meta=True, **kwargs), load_recipe("se-to-eca"), EFFICIENT)
    found = find_native(
        EFFICIENT, kwargs, apply_plan(create_model(EFFICIENT, meta=True, **kwargs), plan), plan
    )
    kwargs["out_indices"].append(4)
    assert found["kwargs"]["out_indices"] == [1, 2]


class _Vanishing(dict):
    """A memo that another thread's convert empties between a membership test and a read."""

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        self.clear()
        return found


def test_a_memo_emptied_by_another_thread_between_lookups_never_raises(monkeypatch):
    convert(EFFICIENT, "se-to-eca", dry_run=True)  # memoised in this process
    monkeypatch.setattr(native, "_BUILT", _Vanishing(native._BUILT))
    monkeypatch.setattr(native, "_FAMILY", {})
    assert convert(EFFICIENT, "se-to-eca", dry_run=True).native == SE_LAYER


def test_one_process_converting_one_model_with_many_kwargs_records_what_timm_builds(monkeypatch, new_process):
    monkeypatch.setattr(native, "_CACHE_SIZE", 2)  # the memo is emptied as it goes, too
    builds = [
        ("seresnet18", {"num_classes": 10}),
        ("seresnet18", {}),
        ("seresnet18", {"in_chans": 1, "num_classes": 10}),
        (EFFICIENT, {"num_classes": 10}),
        (EFFICIENT, {"features_only": True, "out_indices": [2, 3]}),
        (EFFICIENT, {"features_only": True}),
        (EFFICIENT, {"drop_rate": 0}),
        (EFFICIENT, {"drop_rate": 0.0}),
        ("seresnet18", {"num_classes": 10}),
    ]
    for name, kwargs in builds:
        result = convert(name, "se-to-eca", dry_run=True, **kwargs)
        assert result.native is not None and result.native["kwargs"].items() >= kwargs.items(), (name, kwargs)
        assert _timm_builds_it(result), (name, kwargs)


@pytest.mark.parametrize("guess", [1, 3, 99], ids=["attn_layer", "conv_attn_layer", "out of range"])
def test_a_stale_first_guess_for_the_class_only_costs_time(monkeypatch, new_process, guess):
    native._FAMILY[EfficientNet] = guess
    result = convert(EFFICIENT, "se-to-eca", dry_run=True)
    assert result.native == SE_LAYER and _timm_builds_it(result)
    assert native._FAMILY[EfficientNet] == 0


def _forge(entries: dict[str, object]) -> None:
    """Write ``entries`` (candidate kwargs as JSON text -> any JSON value) into the cache file."""
    facts = BuildFacts.of(EFFICIENT, {})
    for candidate, value in entries.items():
        facts.file.put("native:" + candidate, value)
    facts.file.save()


def test_forged_native_entries_of_every_form_never_reach_a_record(tmp_path, new_process):
    convert(EFFICIENT, "se-to-eca", dry_run=True)
    target = BuildFacts.of(EFFICIENT, {}).native({"se_layer": "eca"})
    _forge(
        {
            spelled({"se_layer": "eca"}): repr(object()),  # the UNKNOWN marker, as text
            spelled({"attn_layer": "eca", "attn_kwargs": {}}): target,  # another candidate's digest
            spelled({"attn": "eca"}): 12,
            spelled({"conv_attn_layer": "eca"}): [target],
        }
    )
    native._BUILT.clear()
    out, folder = tmp_path / "m.safetensors", tmp_path / "timm"
    result = convert(EFFICIENT, "se-to-eca", output=out, timm_dir=folder)
    assert result.native == SE_LAYER
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["timm_native"]) == SE_LAYER
    x = torch.randn(1, 3, 64, 64)
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():  # timm's EcaModule computes the same function in another op order
        torch.testing.assert_close(plain(x), load_patched(out).eval()(x), rtol=1e-5, atol=1e-5)
    assert BuildFacts.of(EFFICIENT, {}).native({"se_layer": "eca"}) == target  # corrected


def test_kwargs_nested_too_deep_for_json_are_unspelled_not_a_crash():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert spelled({"out_indices": deep}) is None


@pytest.fixture(scope="module")
def module_cache() -> str | None:
    """The cache folder a module-scoped fixture (one that converts, as many do) would use."""
    return os.environ.get("ECA_SURGERY_CACHE")


def test_a_module_scoped_fixture_never_reaches_the_users_cache_folder(module_cache, tmp_path_factory):
    assert module_cache is not None
    assert Path(module_cache).is_relative_to(tmp_path_factory.getbasetemp())
