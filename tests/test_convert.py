import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from randomised import assert_same_tensors, has_buffers, randomise_
from safetensors.torch import load_file, save_file
from timm.layers import EcaModule
from typer.testing import CliRunner

import eca_surgery
from eca_surgery.cli import app
from eca_surgery.eca import eca_kernel_size
from eca_surgery.recipe import load_recipe
from eca_surgery.surgery import convert

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seresnet50_json(tmp_path_factory):
    """seresnet50 converted from a checkpoint whose parameters and buffers are all random (timm's
    own init zeroes the last norm of each block, which would hide a misplaced or wrong ECA)."""
    folder = tmp_path_factory.mktemp("convert")
    source, out = folder / "src.safetensors", folder / "out.safetensors"
    save_file(randomise_(timm.create_model("seresnet50")).state_dict(), source)
    recipe = str(REPO / "recipes" / "se-to-eca.yaml")
    result = runner.invoke(
        app, ["convert", "seresnet50", "-r", recipe, "-c", str(source), "--output", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_seresnet50_matches_timm_eca_resnet50(seresnet50_json):
    out, report = seresnet50_json
    timm_eca = timm.create_model("resnet50", block_args=dict(attn_layer="eca")).eval()
    assert report["params_after"] == sum(p.numel() for p in timm_eca.parameters())
    assert report["params_delta"] == report["params_after"] - report["params_before"]
    assert len(report["edits"]) == 16
    for key in ("path", "action", "channels", "kernel_size", "params_before", "params_after"):
        assert all(key in e for e in report["edits"])

    timm_eca.load_state_dict(load_file(out), strict=True)
    patched = eca_surgery.load_patched(out)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(timm_eca(x), patched(x))


def test_kernel_sizes_and_block_outputs_follow_the_article(seresnet50_json, article_eca):
    out, report = seresnet50_json
    for edit in report["edits"]:
        assert edit["kernel_size"] == eca_kernel_size(edit["channels"])
        assert edit["params_after"] == edit["kernel_size"]
    model = eca_surgery.load_patched(out)
    with torch.no_grad():  # timm zero-initialises the last BN of each block: make inputs non-trivial
        for name, p in model.named_parameters():
            if name.endswith("bn3.weight"):
                p.fill_(1.0)
    ecas = {n: m for n, m in model.named_modules() if isinstance(m, EcaModule)}
    assert sorted(ecas) == sorted(e["path"] for e in report["edits"])
    diffs = {}

    def compare(name, module, args, output):  # at hook time, before in-place ops downstream
        x = args[0] / args[0].std()  # the block's real input, at the unit scale of a trained net
        ref = article_eca(x.shape[1])
        ref.conv.weight.copy_(module.conv.weight)
        diffs[name] = (ref(x) - module.forward(x)).abs().max().item()

    hooks = [m.register_forward_hook(lambda m, a, y, n=n: compare(n, m, a, y)) for n, m in ecas.items()]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert len(diffs) == 16 and max(diffs.values()) < 1e-6


def test_load_patched_is_bitwise_and_matches_in_memory(tmp_path):
    source = tmp_path / "src.safetensors"
    save_file(randomise_(timm.create_model("seresnet18")).state_dict(), source)
    result = convert("seresnet18", load_recipe("se-to-eca"), checkpoint=source)
    memory = result.model.eval().state_dict()
    assert has_buffers(memory)
    out = tmp_path / "m.safetensors"
    eca_surgery.save_patched(result.model, out, result.plan)
    saved = load_file(out)
    assert saved.keys() == memory.keys()
    assert_same_tensors(memory, saved)  # parameters and buffers, as they were in memory
    loaded = eca_surgery.load_patched(out)
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    assert_same_tensors(saved, state)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_checkpoint_weights_are_kept_bit_identical(tmp_path):
    source = randomise_(timm.create_model("seresnet18"))  # parameters and buffers no init could produce
    ckpt = tmp_path / "src.safetensors"
    save_file(source.state_dict(), ckpt)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(
        app, ["convert", "seresnet18", "-r", "se-to-eca", "-c", str(ckpt), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    original, converted = load_file(ckpt), load_file(out)
    assert has_buffers(original)
    se_keys = {k for k in original if ".se." in k}
    assert se_keys and all(".fc1." in k or ".fc2." in k for k in se_keys)
    assert_same_tensors({k: v for k, v in original.items() if k not in se_keys}, converted)
    new_keys = converted.keys() - original.keys()
    assert new_keys == {k.rsplit(".se.", 1)[0] + ".se.conv.weight" for k in se_keys}
    assert converted.keys() == (original.keys() - se_keys) | new_keys
    assert json.loads(result.stdout)["source_weights"] == str(ckpt)


@pytest.mark.parametrize(
    "name,se_class,count",
    [
        ("efficientnet_b0", "SqueezeExcite", 16),
        ("ese_vovnet19b_dw", "EffectiveSEModule", 4),
        ("seresnet18", "SEModule", 8),
    ],
)
def test_inspect_finds_se_blocks_and_reads_channels_from_weights(
    name, se_class, count, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["inspect", name, "--recipe", "se-to-eca", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    blocks = report["se_blocks"]
    assert len(blocks) == count and all(b["class"].endswith(se_class) for b in blocks)
    model = timm.create_model(name)
    for block in blocks:
        module = model.get_submodule(block["path"])
        first = next(module.parameters())
        assert block["channels"] == first.shape[1]
    removed = sum(b["params"] for b in blocks)
    added = sum(eca_kernel_size(b["channels"]) for b in blocks)
    assert report["params_delta"] == added - removed
    assert report["params_before"] == sum(p.numel() for p in model.parameters())
    assert list(tmp_path.iterdir()) == []


def test_efficientnet_converts_and_runs(tmp_path):
    result = convert("efficientnet_b0", load_recipe("se-to-eca"))
    assert result.check["output_shape"] == [1, 1000]
    expanded = [e for e in result.plan.edits if e.channels != 16]
    assert expanded, "EfficientNet SE runs on expanded channels"


def test_inspect_without_recipe_and_human_output(tmp_path):
    result = runner.invoke(app, ["inspect", "seresnet18"])
    assert result.exit_code == 0, result.output
    assert "layer4.1.se" in result.stdout and "SEModule" in result.stdout


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["convert", "seresnet18", "-r", "se-to-eca", "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_verify_cli(seresnet50_json):
    out, report = seresnet50_json
    result = runner.invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 0, result.output
    verified = json.loads(result.stdout)
    assert verified["params_after"] == report["params_after"]
    assert verified["check"]["output_shape"] == [1, 1000]


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "eca_surgery", "--help"], capture_output=True, text=True, check=True
    )
    assert "convert" in result.stdout
