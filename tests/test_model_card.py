"""The model card (README.md) a --timm-dir export carries: YAML front matter the Hugging Face
hub reads, then Markdown with the plan, the figures convert --json printed, the init record
and the loading code; and text from files or users cannot break its layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from cli_helpers import run_fail, run_ok
from randomised import assert_same_tensors, randomise_

from eca_surgery import SurgeryError, convert, export_checkpoint, load_patched
from eca_surgery.card import ModelCard, source_license, timm_loading


def _split(card: str) -> tuple[dict, str]:
    """The front matter (parsed) and the Markdown body of a card."""
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep, "no closing --- for the front matter"
    return yaml.safe_load(head), body


def test_a_timm_dir_export_carries_a_card_with_the_figures_convert_printed(tmp_path):
    folder = tmp_path / "seresnet18-eca"
    report = json.loads(
        run_ok(
            [
                "convert",
                "seresnet18",
                "-r",
                "se-to-eca",
                "--timm-dir",
                str(folder),
                "--init",
                "fit-se",
                "--json",
            ]
        )
    )
    meta, body = _split((folder / "README.md").read_text(encoding="utf-8"))
    assert meta["library_name"] == "timm" and "eca-surgery" in meta["tags"]
    assert "license" not in meta  # random init: unknown, left to the user (a comment says so)
    assert "# license: fill in" in (folder / "README.md").read_text()
    for figure in (report["params_before"], report["params_after"]):
        assert f"| {figure:,} |" in body or f" {figure:,} |" in body
    assert f"{report['macs_before'] / 1e9:.3f}" in body and f"{report['macs_after'] / 1e9:.3f}" in body
    for edit in report["edits"]:
        assert (
            f"| `{edit['eca_path']}` | replaces SEModule | {edit['channels']} | {edit['kernel_size']} |"
            in body
        )
    assert "Init: `fit-se`." in body and '"method": "fit-se"' in body
    assert f'timm.create_model("local-dir:{folder.name}", pretrained=True)' in body


def test_the_license_is_named_only_for_timms_own_pretrained_file():
    class Model:
        pretrained_cfg = {"hf_hub_id": "timm/seresnet50.a1_in1k", "license": "apache-2.0"}

    cached = "/home/u/.cache/huggingface/hub/models--timm--seresnet50.a1_in1k/snapshots/x/model.safetensors"
    assert source_license(Model(), cached) == "apache-2.0"
    assert source_license(Model(), "/data/my-finetune.safetensors") is None
    assert source_license(object(), cached) is None


def test_text_from_files_cannot_break_the_card():
    plan = convert("seresnet18", "se-to-eca", dry_run=True, flops=False).plan
    hostile = "evil`name | with\npipes\n---\nlicense: stolen"
    card = ModelCard(
        plan, hostile, timm_loading("d"), heal={"step": 3, "teacher": hostile, "loss_first": 1.0}
    )
    text = card.to_markdown()
    meta, body = _split(text)
    assert "license" not in meta
    assert text.count("\n---\n") == 1  # the source cannot close the front matter early
    assert "`evil'name \\| with pipes --- license: stolen`" in body
    assert "3 steps of distillation from" in body


def _python_block(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "mobilenetv3_small_050"])
def test_a_hub_folder_holds_the_checkpoint_and_a_card_whose_code_loads_it(name, tmp_path):
    patched = convert(name, "se-to-eca").save(tmp_path / "p.safetensors")
    report = json.loads(run_ok(["export", str(patched), "--hub-dir", str(tmp_path / "hub"), "--json"]))
    assert report["hub_dir"] == str(tmp_path / "hub") and report["formats"] == []
    card = (tmp_path / "hub" / "README.md").read_text(encoding="utf-8")
    meta, body = _split(card)
    assert meta["library_name"] == "eca-surgery" and meta["pipeline_tag"] == "image-classification"
    code = _python_block(card)
    assert "pip install" in code and ("torchvision==" in code) == name.startswith("torchvision:")
    script = code + "\nimport torch\ntorch.save(model.state_dict(), 'sd.pt')\n"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert_same_tensors(load_patched(patched).state_dict(), torch.load(tmp_path / "sd.pt"))
    message = run_fail(["export", str(patched), "--hub-dir", str(tmp_path / "hub")], tmp_path)
    assert "already exists" in message or "--force" in message


def test_a_hub_folder_of_a_module_object_is_refused(tmp_path):
    net = randomise_(timm.create_model("seresnet18"))
    path = convert(net, "se-to-eca").save(tmp_path / "m.safetensors")
    with pytest.raises(SurgeryError, match="a hub folder cannot carry that code"):
        export_checkpoint(path, hub_dir=tmp_path / "hub", model=timm.create_model("seresnet18"))
    assert not (tmp_path / "hub").exists()
