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
from eca_surgery.evaluation import Labelled, labelled_files
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


def test_non_finite_logits_count_as_misses_not_as_class_zero():
    """argmax picks a NaN's index, so a patched model with NaN logits scored top-1/top-5 on every
    image of class 0 and gave no note; now such images are misses and are counted in a note."""
    from eca_surgery.evaluation import _SUMS, _batch_sums, _notes

    patched = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 5.0, 0.0]])
    original = torch.tensor([[3.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    figures = dict(zip(_SUMS, _batch_sums(patched, original, torch.tensor([0, 1])).tolist(), strict=True))
    assert figures["patched_top1"] == 1 and figures["patched_top5"] == 1  # the finite image only
    assert figures["original_top1"] == 2 and figures["agree"] == 1
    assert figures["patched_nonfinite"] == 1 and figures["original_nonfinite"] == 0
    (note,) = _notes(Labelled([], None, None), figures)
    assert note.startswith("1 of 2 images gave non-finite") and "patched model" in note


def test_upper_case_synset_folders_label_their_images(tmp_path):
    """A folder N01443537 was not read as a synset, so its images silently took the synset of
    their file names (or failed): the nearest folder must win whatever its case."""
    folder = tmp_path / "N01443537"
    folder.mkdir()
    (folder / "n01440764_1.png").write_bytes(b"")
    (folder / "x.JPEG").write_bytes(b"")
    found = labelled_files(tmp_path, "imagenet")
    assert found.targets == [1, 1]
