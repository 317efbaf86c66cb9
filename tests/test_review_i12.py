"""Hostile review of issue 12's surfaces (SE registry, any nn.Module, torchvision by name):
each test here failed before its fix."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from eca_surgery import SurgeryError, convert, load_patched, save_patched
from eca_surgery.detect import register_se, unregister_se
from eca_surgery.models import _LOCK, _block_params_off_meta, create_model


class SE(nn.Module):
    """An SE block of a class the tool does not know."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Net(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv, self.se, self.head = nn.Conv2d(3, c, 3, padding=1), SE(c), nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(self.conv(x)).mean((2, 3)))


@pytest.fixture
def registered() -> Iterator[None]:
    register_se(SE, channels="fc1", gate="gate")
    yield
    unregister_se(SE)


def test_regnet_patch_is_restored_when_meta_builds_overlap() -> None:
    """A second thread that starts a meta build while the first holds the patch must not take
    the patched method for the original and leave it in place."""
    from torchvision.models.regnet import BlockParams

    original = BlockParams.__dict__["from_init_params"]
    second = threading.Thread(target=lambda: create_model("torchvision:regnet_y_400mf", meta=True))
    with _block_params_off_meta():
        second.start()
        time.sleep(0.5)  # the second build reaches the lock while the patch is in place
    second.join(60)
    assert BlockParams.__dict__["from_init_params"] is original
    assert not _LOCK.locked()


def test_load_patched_refuses_a_model_that_is_not_a_module(tmp_path, registered) -> None:
    result = convert(Net(), "se-to-eca")
    path = save_patched(result.model, tmp_path / "n.safetensors", result.plan, original=result.original)
    for bad in ("Net", Net):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            load_patched(path, model=bad)


def test_convert_refuses_a_meta_module_without_weights(registered) -> None:
    """A model object on the meta device has no weights to convert (and no checkpoint gives them)."""
    with pytest.raises(SurgeryError, match="meta device"):
        convert(Net().to("meta"), "se-to-eca")
    assert convert(Net().to("meta"), "se-to-eca", dry_run=True).plan.edits  # planning needs no weights


def test_convert_takes_a_float64_module(registered) -> None:
    result = convert(Net().double(), "se-to-eca")
    assert result.dtype == "float64"


@pytest.mark.parametrize("what", ["channels", "gate"])
@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("k"), RuntimeError("r")])
def test_register_se_callable_that_raises_is_a_clean_error(what: str, exc: Exception) -> None:
    def raises(module: nn.Module) -> int:
        raise exc

    register_se(SE, **({"channels": raises} if what == "channels" else {"channels": "fc1", "gate": raises}))
    try:
        with pytest.raises(SurgeryError, match="SE.*registered"):
            convert(Net(), "se-to-eca")
    finally:
        unregister_se(SE)


def test_heal_takes_a_torchvision_checkpoint() -> None:
    """heal takes torchvision models now (tests/test_torchvision_heal.py heals them), not
    refused as 'a features_only model?'."""
    from eca_surgery.healing import _check_classifier

    _check_classifier(create_model("torchvision:mobilenet_v3_small", meta=True), "'x.safetensors'")
