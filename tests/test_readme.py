"""The README's Python API example, run as written (only heal's step count is cut).

It converts a seresnet50 fine-tuned with ``num_classes=10`` (randomised weights here),
saves it, reloads it and heals it: the file must rebuild the model with its kwargs and
record the source weights heal takes its teacher from.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from heal_inputs import noise_images
from randomised import assert_same_tensors, randomise_
from safetensors.torch import load_file, save_file

README = Path(__file__).parent.parent / "README.md"


def api_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    import timm

    monkeypatch.chdir(tmp_path)
    source = randomise_(timm.create_model("seresnet50", pretrained=False, num_classes=10), seed=3)
    save_file(source.state_dict(), "seresnet50-10cls.safetensors")
    noise_images(tmp_path / "images", 2, size=40)
    return tmp_path


def test_the_api_example_saves_a_file_that_reloads_and_heals(workdir):
    convert_block, heal_block = api_blocks()
    scope: dict = {}
    exec(compile(convert_block, "README.md (convert)", "exec"), scope)  # asserts reloaded == in memory
    result, model = scope["result"], scope["model"]
    assert "# -2530906" in convert_block and result.plan.params_delta == -2530906
    assert result.model_kwargs == {"num_classes": 10}
    assert_same_tensors(result.model.state_dict(), model.state_dict())
    assert model.get_classifier().out_features == 10

    heal_block = heal_block.replace("steps=200", "steps=1")
    exec(compile(heal_block, "README.md (heal)", "exec"), scope)
    healed = load_file(workdir / "seresnet50-healed.safetensors")
    assert healed.keys() == model.state_dict().keys()
    assert scope["healed"].step == 1
    # the teacher was the recorded source checkpoint, with the file's kwargs (10 classes)
    record = scope["eca_surgery"].open_patched("seresnet50-healed.safetensors").record
    assert record.provenance.heal["teacher_weights"] == "seresnet50-10cls.safetensors"
    assert record.model_kwargs == {"num_classes": 10}
