"""What lets a heal run continue exactly where it stopped: the heal record in the output's
metadata and the optimizer state in its ``.heal-state.pt`` companion.

Both are read as untrusted input (a damaged or foreign record or state is one clean
error, never a traceback), and a run continues only with the settings, data, source and
teacher it began with, from the step both files agree on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import SurgeryError
from .outputs import atomic_write_file

# the settings a resumed run must share with the run it continues
RESUME_KEYS = ("train", "lr", "batch_size", "seed", "temperature", "feature_weight", "weight_decay")

_AFRESH = "start afresh from it as `patched_path` without `resume=True` (into another `output`)"


def state_path(output: str | Path) -> Path:
    """The companion file that holds a heal run's optimizer state."""
    output = Path(output)
    return output.with_name(output.name + ".heal-state.pt")


def write_state(output: Path, step: int, optimizer: torch.optim.Optimizer) -> Path:
    """Write the optimizer state of ``step`` beside ``output`` (atomically, see
    :func:`outputs.atomic_write_file`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so that a failed write raises OSError
            torch.save({"step": step, "optimizer": optimizer.state_dict()}, f)

    return atomic_write_file(state_path(output), write, force=True)


def heal_record(output: Path, heal: Any) -> dict[str, Any] | None:
    """The heal record of an earlier run's ``output`` (its checkpoint record's ``heal``),
    checked for the shape :func:`resume_point` reads: None if there is none."""
    bad = SurgeryError(
        f"`resume=True`: the heal record in {str(output)!r} is damaged or not one this eca-surgery "
        f"wrote, so the run cannot continue; {_AFRESH}."
    )
    if heal is None:
        return None
    settings = heal.get("settings") if isinstance(heal, dict) else None
    step = heal.get("step") if isinstance(heal, dict) else None
    if not isinstance(settings, dict) or any(k not in settings for k in RESUME_KEYS):
        raise bad
    if type(step) is not int or step < 0:
        raise bad
    return heal


def read_state(state: Path) -> dict[str, Any]:
    """Heal's optimizer state file (tensors and plain data only: ``weights_only``)."""
    try:
        opt = torch.load(state, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle refusals, a damaged zip, an unreadable file...
        raise SurgeryError(
            f"`resume=True`: the optimizer state {str(state)!r} cannot be read safely "
            f"({type(exc).__name__}); it is damaged, not one eca-surgery wrote, or holds more than "
            "tensors and plain data. Start afresh without `resume=True` (into another `output`)."
        ) from None
    if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict):
        raise SurgeryError(
            f"`resume=True`: the optimizer state {str(state)!r} is not one eca-surgery wrote. Start "
            "afresh without `resume=True` (into another `output`)."
        )
    return opt


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Load a saved optimizer state into ``opt``, refusing one made for other parameters."""
    bad = SurgeryError(
        f"`resume=True`: the optimizer state {str(path)!r} was saved for other parameters than the "
        "model now trains; it does not go with this run. Start afresh without `resume=True` (into "
        "another `output`)."
    )
    params = [p for group in opt.param_groups for p in group["params"]]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError):
        raise bad from None
    for p in params:
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise bad
    if any(not isinstance(v, dict) for v in opt.state.values()):
        raise bad


def check_resumable(output: Path) -> None:
    """Refuse ``resume=True`` when there is no earlier output to continue."""
    if not output.is_file():
        raise SurgeryError(
            f"`resume=True`: {str(output)!r} does not exist, so there is no earlier run to continue; "
            "drop `resume=True` to start one."
        )


def resume_point(
    output: Path, record: dict[str, Any] | None, settings: dict[str, Any], steps: int, origin: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The heal ``record`` of an earlier run's ``output`` and its optimizer state, checked to
    go with a run of ``settings`` (as a dict), ``steps`` and ``origin``."""
    heal = heal_record(output, record)
    if heal is None:
        raise SurgeryError(
            f"`resume=True`: {str(output)!r} was not written by `eca-surgery heal`, so there is "
            "nothing to resume; drop `resume=True` (and pass `force=True` to overwrite it) or choose "
            "another `output`."
        )
    changed = [
        f"{k} {heal['settings'][k]} -> {settings[k]}"
        for k in RESUME_KEYS
        if heal["settings"][k] != settings[k]
    ]
    changed += [f"{k} {heal.get(k)!r} -> {v!r}" for k, v in origin.items() if heal.get(k) != v]
    if changed:
        raise SurgeryError(
            f"`resume=True`: {str(output)!r} was healed with other settings ({'; '.join(changed)}); "
            "resume with the same settings, or start afresh into another `output`."
        )
    if heal["step"] >= steps:
        raise SurgeryError(
            f"`resume=True`: {str(output)!r} has already been healed for {heal['step']} steps; "
            f"pass `steps` above {heal['step']} to train further."
        )
    state = state_path(output)
    opt = read_state(state) if state.is_file() else None
    if opt is None or opt.get("step") != heal["step"]:
        raise SurgeryError(
            f"`resume=True`: the optimizer state {str(state)!r} that goes with {str(output)!r} is "
            "missing or from another step, so the run cannot continue exactly. Restore it, or "
            f"start afresh from {str(output)!r} as `patched_path` without `resume=True` (into another "
            "`output`)."
        )
    return heal, opt
