"""The model card (README.md) a --timm-dir export carries: YAML front matter the Hugging Face
hub reads, then Markdown with the plan, the figures convert --json printed, the init record
and the loading code; and text from files or users cannot break its layout."""

from __future__ import annotations

import json

import yaml
from cli_helpers import run_ok

from eca_surgery import convert
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
