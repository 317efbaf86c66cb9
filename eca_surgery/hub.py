"""A model folder for the Hugging Face hub for a model timm cannot build itself: the
eca-surgery checkpoint (``model.safetensors``) and a model card (``README.md``) with the
code that loads it and the versions that wrote it.

Like a ``--timm-dir`` export, the folder is written under a temporary name, marked as this
tool's export and renamed into place; only an earlier export (or an empty folder) is replaced.
"""

from __future__ import annotations

from pathlib import Path

from .card import ModelCard, hub_loading, task_of
from .checkpoint import Patched, checkpoint_contents, save_safetensors, tensor_bytes
from .errors import SurgeryError
from .outputs import atomic_write_dir, check_dir_output

EXPORT_KIND = "hub-dir"
CHECKPOINT = "model.safetensors"


def check_hub_dir(path: str | Path, force: bool) -> Path:
    """Refuse a folder that may not be written (see ``outputs.check_dir_output``)."""
    return check_dir_output(path, force, EXPORT_KIND)


def hub_card(patched: Patched, folder: str) -> ModelCard:
    """The card of ``patched``'s checkpoint in a folder named ``folder``: its plan, records,
    MACs counted on a meta-device build, and the loading code."""
    from dataclasses import asdict

    from . import __version__
    from .checkpoint import Versions
    from .models import create_model, dtype_of
    from .surgery import macs_before_after

    record = patched.record
    meta = create_model(record.model, meta=True, **record.model_kwargs)
    macs = macs_before_after(meta, record.plan)
    versions = asdict(Versions.current())  # those the folder's checkpoint is written by
    if record.model.startswith("torchvision:"):
        import torchvision

        versions["torchvision"] = torchvision.__version__
    return ModelCard(
        record.plan,
        record.provenance.source,
        hub_loading(folder, versions),
        library="eca-surgery",
        macs=macs,
        init=record.provenance.init,
        heal=record.provenance.heal,
        dtype=dtype_of(patched.model),
        version=__version__,
        task=task_of(patched.model),
    )


def save_hub_dir(patched: Patched, path: str | Path, force: bool = False) -> Path:
    """Write ``path``: ``patched``'s model as an eca-surgery checkpoint (in the model's dtype)
    and its card. A model converted from a module object is refused: loading it needs the
    user's class, which no folder can name safely."""
    if not patched.record.by_name:
        raise SurgeryError(
            f"{patched.model_name} was converted from a module object, which loads only with its class "
            "(`load_patched(path, model=...)`); a hub folder cannot carry that code. Share the checkpoint "
            "with the code that builds the model instead."
        )
    card = hub_card(patched, Path(path).name)
    tensors, metadata = checkpoint_contents(patched.model, patched.record)

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp / CHECKPOINT, metadata)
        (tmp / "README.md").write_text(card.to_markdown(), encoding="utf-8")

    return atomic_write_dir(path, write, force, EXPORT_KIND, tensor_bytes(tensors))
