"""Heal a patched model: distil the original (teacher) into it on unlabelled images.

The loss is the KL divergence between the teacher's and the student's softened logits
(times T^2, as in Hinton et al.), plus optionally the mean squared difference of
their ``forward_features`` maps. Only the chosen parameters train: the new ECA
kernels (``eca``), those and every normalisation layer, whose running statistics also
update (``norm``), or everything (``all``). AdamW at a constant learning rate.

Healing is resumable and deterministic: step ``s`` always sees the same images, and
the output's metadata and its ``.heal-state.pt`` companion (optimizer moments) let a
run continue exactly where it stopped. Under ``torchrun`` each process takes its own
share of every batch (DistributedDataParallel) and process 0 writes the files.
"""

from __future__ import annotations

import math
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Patched, check_output, open_patched, save_patched
from .data import ImageFiles, data_config, image_files, training_batches
from .errors import CheckpointError, StoppedBySignal, SurgeryError
from .jsontext import loads_strict
from .models import build_with_weights, check_seed, input_size
from .outputs import check_outputs_apart, staged_file
from .paths import stat_input
from .weights import read_state_dict

TRAIN = ("eca", "norm", "all")
# the settings a resumed run must share with the run it continues
RESUME_KEYS = ("train", "lr", "batch_size", "seed", "temperature", "feature_weight", "weight_decay")


@dataclass(frozen=True)
class HealSettings:
    """What a heal run trains, and how."""

    steps: int = 200
    lr: float = 1e-3
    train: str = "norm"
    batch_size: int = 32
    temperature: float = 1.0
    feature_weight: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if self.train not in TRAIN:
            raise SurgeryError(f"Unknown --train {self.train!r}; choose one of: {', '.join(TRAIN)}.")
        check_seed(self.seed)
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SurgeryError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}."
                )
        for name in ("lr", "temperature"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise SurgeryError(f"--{name} must be a positive finite number, got {getattr(self, name)}.")
        for name in ("feature_weight", "weight_decay"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise SurgeryError(
                    f"--{name.replace('_', '-')} must be a finite number of at least 0, got {getattr(self, name)}."
                )


@dataclass
class HealResult:
    """A healed model and how its training went."""

    patched: Patched
    settings: HealSettings
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    output: Path | None = None
    rank: int = 0

    @property
    def model(self) -> nn.Module:
        return self.patched.model


_NORM_NAME = re.compile(r"(Rms|Simple|Layer|Group|Batch|Instance)?Norm(Act)?[123]?d?")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's BatchNorm, InstanceNorm, LayerNorm and GroupNorm (timm's
    BatchNormAct2d, LayerNorm2d, ... subclass them) and timm's RmsNorm/SimpleNorm. Not a
    block that merely contains one, such as ``ConvNormAct`` or ``NormMlpClassifierHead``."""
    torch_norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return isinstance(module, torch_norms) or bool(_NORM_NAME.fullmatch(type(module).__name__))


def select_trainable(model: nn.Module, eca_paths: list[str], train: str) -> list[str]:
    """Freeze ``model`` but for what ``train`` names; return the trainable parameter names.

    Also sets the training mode: all of the model for ``all``, else only trainable norm
    layers (so their running statistics follow the patched features).
    """
    model.eval().requires_grad_(train == "all")
    if train == "all":
        model.train()
        return [n for n, _ in model.named_parameters()]
    norms = {m for m in model.modules() if is_norm(m)} if train == "norm" else set()
    modules = [model.get_submodule(p) for p in eca_paths] + list(norms)
    for m in modules:
        for p in m.parameters(recurse=m not in norms):
            p.requires_grad_(True)
        if m in norms:
            m.train()
    return [n for n, p in model.named_parameters() if p.requires_grad]


class _FeaturesAndLogits(nn.Module):
    """Run a timm classifier as ``forward_features`` then ``forward_head``, returning both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.forward_head(features)


def distillation_loss(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    temperature: float,
    feature_weight: float,
) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, times T^2, plus
    ``feature_weight`` times the MSE of the feature maps."""
    (s_feat, s_logits), (t_feat, t_logits) = student, teacher
    t = temperature
    loss = F.kl_div(
        F.log_softmax(s_logits.float() / t, 1),
        F.log_softmax(t_logits.float() / t, 1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    if feature_weight:
        loss = loss + feature_weight * F.mse_loss(s_feat.float(), t_feat.float())
    return loss


def state_path(output: str | Path) -> Path:
    """The companion file that holds a heal run's optimizer state."""
    output = Path(output)
    return output.with_name(output.name + ".heal-state.pt")


def build_teacher(
    name: str, checkpoint: str | Path | None, model_kwargs: dict[str, Any]
) -> tuple[nn.Module, str]:
    """The original model with its trained weights: from ``checkpoint``, else timm's
    pretrained weights from the Hugging Face cache."""
    from .weights import pretrained_file

    if checkpoint is not None:
        path, source = Path(checkpoint), str(checkpoint)
    else:
        path, source = pretrained_file(name, "--teacher-checkpoint")
    model, _ = build_with_weights(
        name, read_state_dict(path), f"Teacher checkpoint {str(path)!r}", **model_kwargs
    )
    return model.eval().requires_grad_(False), source


def _distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless started by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def pick_device(device: str | None) -> torch.device:
    """``device``, else this process's GPU under torchrun, the GPU, or the CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise SurgeryError(
                f"--device {device!r} is not a device; use e.g. cpu, cuda or cuda:1."
            ) from None
        if dev.type == "cuda" and (
            not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
        ):
            raise SurgeryError(
                f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) that torch can "
                "use; pick one of them or --device cpu."
            )
        return dev
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _heal_record(output: Path, text: str) -> dict[str, Any] | None:
    """The heal record of an earlier run's ``output`` (its ``heal`` metadata), checked for
    the shape :func:`_resume_point` reads: None if there is none."""
    bad = SurgeryError(
        f"--resume: the heal record in {str(output)!r} is damaged or not one this eca-surgery wrote, "
        "so the run cannot continue; start afresh from it as PATCHED without --resume (into another "
        "--output)."
    )
    try:
        heal = loads_strict(text)
    except (ValueError, TypeError):
        raise bad from None
    if heal is None:
        return None
    settings = heal.get("settings") if isinstance(heal, dict) else None
    step = heal.get("step") if isinstance(heal, dict) else None
    if not isinstance(settings, dict) or any(k not in settings for k in RESUME_KEYS):
        raise bad
    if type(step) is not int or step < 0:
        raise bad
    return heal


def _read_state(state: Path) -> dict[str, Any]:
    """Heal's optimizer state file (tensors and plain data only: ``weights_only``)."""
    try:
        opt = torch.load(state, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle refusals, a damaged zip, an unreadable file...
        raise SurgeryError(
            f"--resume: the optimizer state {str(state)!r} cannot be read safely "
            f"({type(exc).__name__}); it is damaged, not one eca-surgery wrote, or holds more than "
            "tensors and plain data. Start afresh without --resume (into another --output)."
        ) from None
    if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict):
        raise SurgeryError(
            f"--resume: the optimizer state {str(state)!r} is not one eca-surgery wrote. Start afresh "
            "without --resume (into another --output)."
        )
    return opt


def _load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Load a saved optimizer state into ``opt``, refusing one made for other parameters."""
    bad = SurgeryError(
        f"--resume: the optimizer state {str(path)!r} was saved for other parameters than the "
        "model now trains; it does not go with this run. Start afresh without --resume (into "
        "another --output)."
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


def _resume_point(
    output: Path, metadata: dict[str, str], settings: HealSettings, origin: dict[str, str]
) -> tuple[dict[str, Any], dict | None]:
    """The heal record in the ``metadata`` of an earlier run's ``output``, and its optimizer state."""
    heal = _heal_record(output, metadata.get("heal", "null") or "null")
    if heal is None:
        raise SurgeryError(
            f"--resume: {str(output)!r} was not written by `eca-surgery heal`, so there is nothing to "
            "resume; drop --resume (and pass --force to overwrite it) or choose another --output."
        )
    mine = asdict(settings)
    changed = [
        f"{k} {heal['settings'][k]} -> {mine[k]}" for k in RESUME_KEYS if heal["settings"][k] != mine[k]
    ]
    changed += [f"{k} {heal.get(k)!r} -> {v!r}" for k, v in origin.items() if heal.get(k) != v]
    if changed:
        raise SurgeryError(
            f"--resume: {str(output)!r} was healed with other settings ({'; '.join(changed)}); resume "
            "with the same settings, or start afresh into another --output."
        )
    if heal["step"] >= settings.steps:
        raise SurgeryError(
            f"--resume: {str(output)!r} has already been healed for {heal['step']} steps; "
            f"pass --steps above {heal['step']} to train further."
        )
    state = state_path(output)
    opt = _read_state(state) if state.is_file() else None
    if opt is None or opt.get("step") != heal["step"]:
        raise SurgeryError(
            f"--resume: the optimizer state {str(state)!r} that goes with {str(output)!r} is missing or "
            "from another step, so the run cannot continue exactly. Restore it, or start afresh from "
            f"{str(output)!r} as PATCHED without --resume (into another --output)."
        )
    return heal, opt


def heal(
    patched_path: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    teacher: str | None = None,
    teacher_checkpoint: str | Path | None = None,
    settings: HealSettings = HealSettings(),
    resume: bool = False,
    force: bool = False,
    save_every: int = 0,
    device: str | None = None,
    workers: int = 0,
    on_step: Callable[[int, int, float, float], None] | None = None,
) -> HealResult:
    """Distil ``teacher`` (by default the patched model's source architecture) into the
    patched checkpoint ``patched_path`` on the images under ``data``; write ``output``.

    With ``resume``, training continues from ``output`` (written by an earlier run with
    the same settings) up to ``settings.steps``. ``on_step(step, steps, loss,
    images_per_s)`` is called after every step (on process 0). ``save_every`` also
    writes ``output`` every that many steps; an interrupt (Ctrl-C) writes it too, so
    ``resume`` can continue.
    """
    settings.check()
    check_loop_options(save_every, workers)
    dev = pick_device(device)
    output = Path(output)
    rank, world = _distributed()
    files = image_files(data)
    _check_outputs(output, patched_path, resume, force, teacher_checkpoint, data)
    origin = {"source": str(Path(patched_path).resolve()), "data": str(Path(data).resolve())}
    if teacher is not None:
        origin["teacher"] = teacher
    if teacher_checkpoint is not None:
        origin["teacher_weights"] = str(teacher_checkpoint)
    if resume and not output.is_file():
        raise SurgeryError(
            f"--resume: {str(output)!r} does not exist, so there is no earlier run to continue; "
            "drop --resume to start one."
        )
    patched = open_patched(output if resume else patched_path)
    heal_meta, opt_state = (
        _resume_point(output, patched.metadata, settings, origin) if resume else (None, None)
    )
    _check_classifier(patched.model, str(patched_path))
    if input_size(patched.model)[0] != 3:
        raise SurgeryError(
            f"heal reads its images as RGB, but {str(patched_path)!r} takes {input_size(patched.model)[0]} "
            "channel(s) (in_chans); heal it in your own training loop on inputs of that shape."
        )
    start = heal_meta["step"] if heal_meta else 0
    history = heal_meta or {"teacher": teacher or patched.model_name, **origin}
    name = history["teacher"]
    if (
        teacher_checkpoint is None
        and "teacher_weights" in history
        and Path(history["teacher_weights"]).is_file()
    ):
        teacher_checkpoint = history["teacher_weights"]  # resuming: the teacher the run began with
    if teacher_checkpoint is None and teacher is None:
        teacher_checkpoint = _source_file(patched, patched_path)
    t_model, t_source = build_teacher(name, teacher_checkpoint, patched.model_kwargs)
    history["teacher_weights"] = t_source
    _check_classifier(t_model, f"teacher {name!r}")
    per_step = min(settings.batch_size, len(files) // world)
    if settings.train != "eca" and per_step < 2:
        raise SurgeryError(
            f"Each step would see {per_step} image(s) per process, but --train {settings.train} updates "
            "BatchNorm statistics, which needs at least 2; add images, raise --batch-size, or use --train eca."
        )
    student = patched.model.to(dev)
    t_model = t_model.to(dev)
    eca_paths = [e.eca_path for e in patched.plan.edits]
    trainable = select_trainable(student, eca_paths, settings.train)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if opt_state is not None:
        _load_optimizer(opt, opt_state["optimizer"], state_path(output))
    net: nn.Module = _FeaturesAndLogits(student)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    teacher_net = _FeaturesAndLogits(t_model)

    dataset = ImageFiles(files, data_config(student))
    batches = training_batches(
        dataset, settings.batch_size, settings.seed, start, rank, world, workers, dev.type == "cuda"
    )
    torch.manual_seed(settings.seed + start)
    result = HealResult(patched, settings, start, start, output=output, rank=rank)
    history.update(settings=asdict(settings), trainable=len(trainable))

    saved: list[int] = [start] if resume else []

    def save() -> None:
        if rank == 0:
            _save(result, history, output, opt)
        saved.append(result.step)

    watched = params + [b for m in student.modules() if m.training and is_norm(m) for b in m.buffers()]

    with _stop_requests() as stop:
        for step in range(start, settings.steps):
            if stop:
                if result.step > start:
                    save()
                saved = f"; progress saved to {str(output)!r}. Run the same command with --resume to continue"
                raise StoppedBySignal(
                    f"Interrupted ({stop[0]}) after step {result.step} of {settings.steps}"
                    + (saved if result.step > start else ", before any step finished; nothing was written")
                    + ".",
                    stop[0],
                )
            tick = time.perf_counter()
            x = next(batches).to(dev, non_blocking=True)
            with torch.no_grad():
                target = teacher_net(x)
            out = net(x)
            if step == start:
                _check_logits(out[1], target[1])
            loss = distillation_loss(out, target, settings.temperature, settings.feature_weight)
            if not math.isfinite(float(loss.detach())):
                raise _diverged(
                    step + 1, f"the loss is {float(loss.detach())}", settings.lr, _last(saved), output
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not _all_finite(watched):
                raise _diverged(step + 1, "weights became NaN or infinite", settings.lr, _last(saved), output)
            result.step = step + 1
            result.losses.append(float(loss.detach()))
            result.images_per_s = x.shape[0] * world / (time.perf_counter() - tick)
            if on_step is not None and rank == 0:
                on_step(step + 1, settings.steps, result.losses[-1], result.images_per_s)
            if save_every and (step + 1) % save_every == 0 and step + 1 < settings.steps:
                save()
    save()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every process returns only once process 0 has written the output
        dist.destroy_process_group()
    student.eval()
    return result


MAX_WORKERS = 256


def check_loop_options(save_every: int, workers: int) -> None:
    """Refuse a negative ``save_every`` and a worker count outside 0..MAX_WORKERS."""
    if save_every < 0:
        raise SurgeryError(
            f"--save-every must be 0 (save at the end only) or a number of steps, got {save_every}."
        )
    if not 0 <= workers <= MAX_WORKERS:
        raise SurgeryError(
            f"--workers must be from 0 (load images in the main process) to {MAX_WORKERS}, got {workers}."
        )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (one device sync for all of them)."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    return not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def _diverged(step: int, what: str, lr: float, saved: int | None, output: Path) -> SurgeryError:
    """The error that stops a run whose loss or weights stopped being finite."""
    kept = (
        f"The last good state, from step {saved}, is in {str(output)!r}: resume from it with --resume "
        "(and a lower --lr into another --output, or the same settings)."
        if saved is not None
        else "Nothing was written."
    )
    return SurgeryError(
        f"Healing diverged at step {step}: {what} (learning rate {lr:g} too high?). The diverged model "
        f"was not saved. {kept} Try a lower --lr."
    )


def _source_file(patched: Patched, path: str | Path) -> Path | None:
    """The weights file ``patched`` was converted from, if it still exists; None for
    timm's pretrained weights; an error for a model converted from random weights."""
    source = patched.metadata.get("source_weights", "")
    if source.startswith("timm pretrained"):
        return None
    if source and Path(source).is_file():
        return Path(source)
    raise SurgeryError(
        f"{str(path)!r} was converted from {source or 'unknown weights'!r}, which is not a file here; "
        "pass the original model's weights with --teacher-checkpoint FILE."
    )


def _last(saved: list[int]) -> int | None:
    return saved[-1] if saved else None


@contextmanager
def _stop_requests():
    """A list that gets the signal's name on Ctrl-C or SIGTERM, so the loop stops between
    steps (where the saved state is consistent) instead of in the middle of one."""
    stop: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request(signum, frame):
        if stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, request)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_classifier(model: nn.Module, what: str) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise SurgeryError(
            f"heal distils a classifier's logits, but {what} is not a timm classifier (a features_only "
            "model?). Heal the classifier checkpoint, then build features from it."
        )


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise SurgeryError(
            f"heal distils logits, but the patched model gives {tuple(student.shape)} and the teacher "
            f"{tuple(teacher.shape)}; pass the teacher the patched model was converted from."
        )


def _save(result: HealResult, history: dict[str, Any], output: Path, opt: torch.optim.Optimizer) -> None:
    """Write the healed checkpoint, then its optimizer state (both atomically: if either
    fails, no temporary is left and the state stays that of the checkpoint on disk)."""
    history = history | {
        "step": result.step,
        "loss_last": result.losses[-1] if result.losses else None,
        "loss_first": history.get("loss_first", result.losses[0] if result.losses else None),
    }
    p = result.patched
    init = p.record.provenance.init
    with staged_file(state_path(output), force=True) as tmp:  # renamed into place after the checkpoint
        with open(tmp, "wb") as f:  # a file object, so that a failed write raises OSError
            torch.save({"step": result.step, "optimizer": opt.state_dict()}, f)
        save_patched(
            p.model,
            output,
            p.plan,
            model_kwargs=p.model_kwargs,
            source=p.record.provenance.source,
            native=p.record.provenance.native,
            init=init,
            heal=history,
            force=True,
        )


def _metadata_json(patched: Patched, key: str, default: Any) -> Any:
    """The JSON object stored under ``key`` in ``patched``'s metadata (only a record kept
    along), or ``default`` where it is missing or damaged."""
    try:
        value = loads_strict(patched.metadata[key])
    except (KeyError, TypeError, ValueError):
        return default
    return value if isinstance(value, dict) else default


def _check_outputs(
    output: Path,
    patched_path: str | Path,
    resume: bool,
    force: bool,
    teacher_checkpoint: str | Path | None = None,
    data: str | Path | None = None,
) -> None:
    """Refuse, before any work, outputs heal may not write: the healed checkpoint (which
    ``resume`` replaces) and its optimizer state, in a writable folder with room for a
    checkpoint as large as the patched one."""
    patched = Path(patched_path)
    st = stat_input(patched, "Checkpoint", CheckpointError)
    size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None
    check_output(output, force or resume, size)
    check_output(state_path(output), True)
    check_outputs_apart(
        {"output": output, "optimizer state": state_path(output)},
        {"patched checkpoint": patched, "teacher checkpoint": teacher_checkpoint, "data folder": data},
    )
