"""Hostile review of issues 14 and 15: evaluate, fit-se with the fold, and convert's overlapped
write and check. Each test pins one bug found by trying to break what landed."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from cli_helpers import run_fail
from torch.utils.data import Dataset

from eca_surgery.data import folder_loader
from eca_surgery.errors import SurgeryError
from eca_surgery.healing import pick_device


@pytest.mark.parametrize("device", ["meta", "lazy", "mps"])
def test_a_device_that_holds_no_values_is_one_clean_error(device):
    """torch.device('meta') parses, but evaluate then died with a traceback on Tensor.item()."""
    with pytest.raises(SurgeryError, match="cannot hold and return values"):
        pick_device(device)


def test_cli_evaluate_on_the_meta_device_is_a_clean_error(tmp_path):
    message = run_fail(
        ["evaluate", str(tmp_path / "p.safetensors"), "--data", str(tmp_path), "--device", "meta"], tmp_path
    )
    assert "--device 'meta' cannot hold and return values" in message


class _TermsItsWorker(Dataset):
    """Each item sends SIGTERM to the process reading it, as ``kill -- -PGID`` reaches every
    DataLoader worker of a stopping run."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.tensor(index), ""


def test_loader_workers_survive_a_process_group_sigterm():
    """Without this, the workers died of the signal and torch printed a 'DataLoader worker is
    killed by signal' traceback from the main process while the CLI was stopping cleanly."""
    loader = folder_loader(_TermsItsWorker(), [[0, 1], [2, 3]], workers=1)
    assert [b[0].tolist() for b in loader] == [[0, 1], [2, 3]]
