"""Heal a patched model: distil the original (teacher) into it on unlabelled images.

The loss is the KL divergence between the teacher's and the student's softened logits
(times T^2, as in Hinton et al.), plus optionally the mean squared difference of
their feature maps (a timm model's ``forward_features``; a torchvision classifier's input
to its ``avgpool``). torchvision's detection and segmentation models are distilled on
their backbone alone (``locate.backbone_path``, where the SE blocks live): the loss is the
mean over the backbone's feature maps of their mean squared difference, and only the
backbone trains; ``temperature`` and ``feature_weight`` do not apply to them. Only the chosen parameters train: the new ECA
kernels (``eca``), those and every normalisation layer, whose running statistics also
update (``norm``), or everything (``all``). AdamW at a constant learning rate.

A run is prepared (:func:`prepare_heal`: inputs and outputs checked, the resume point,
teacher, student, optimizer and batches made ready) and then trained (:func:`train`: the
loop, saving, stop requests and divergence); :func:`heal` does both. Healing is
resumable and deterministic: step ``s`` always sees the same images, and the output's
metadata and its ``.heal-state.pt`` companion (optimizer moments, see ``resume``) let a
run continue exactly where it stopped. Under ``torchrun`` each process takes its own
share of every batch (DistributedDataParallel) and process 0 writes the files.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Patched, open_patched, write_checkpoint
from .choices import MAX_WORKERS, DType, Train, choice
from .data import ImageFiles, data_config, image_files, is_torchvision, training_batches
from .errors import CheckpointError, StoppedBySignal, SurgeryError
from .locate import backbone_path
from .models import build_with_weights, check_seed, dtype_of, float_dtype, input_size
from .outputs import check_file_output, check_outputs_apart, clean_outputs, written_together
from .paths import stat_input
from .resume import check_resumable, load_optimizer, resume_point, state_path, write_state
from .weights import read_state_dict

__all__ = ["HealResult", "HealRun", "HealSettings", "heal", "prepare_heal", "state_path", "train"]

OnStep = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class HealSettings:
    """What a heal run trains, and how. Checked when made: a bad value is a SurgeryError
    naming the parameter; ``train`` may be a :class:`~eca_surgery.choices.Train` or its string."""

    steps: int = 200
    lr: float = 1e-3
    train: Train = Train.NORM
    batch_size: int = 32
    temperature: float = 1.0
    feature_weight: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    dtype: DType | None = (
        None  # of the healed file (None: that of the patched file); training runs in float32
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", choice(Train, self.train, "train"))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", choice(DType, self.dtype, "dtype"))
        self.check()

    def check(self) -> None:
        """Refuse values a run cannot use, naming the parameter (e.g. `` `steps` ``)."""
        check_seed(self.seed)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise SurgeryError(f"`{name}` must be an integer, got {str(value)[:40]!r}.")
            if value < 1:
                raise SurgeryError(f"`{name}` must be at least 1, got {value}.")
        for name, least in (("lr", None), ("temperature", None), ("feature_weight", 0), ("weight_decay", 0)):
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value > 0 if least is None else value >= least)):
                what = "a positive finite number" if least is None else "a finite number of at least 0"
                raise SurgeryError(f"`{name}` must be {what}, got {str(value)[:40]}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, as the heal record holds them."""
        return asdict(self) | {"train": self.train.value, "dtype": self.dtype and self.dtype.value}


@dataclass
class HealResult:
    """A healed model, how its training went, and the heal record written with it."""

    patched: Patched
    settings: HealSettings
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    rank: int = 0
    history: dict[str, Any] | None = None  # the heal record last saved (None: nothing saved yet)
    leftovers: list[Path] = field(default_factory=list)  # temporaries of killed runs, removed

    @property
    def model(self) -> nn.Module:
        return self.patched.model

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the healed model with its heal record to ``path`` (a checkpoint that
        ``load_patched`` loads; its optimizer state stays with the run's own output)."""
        if self.history is None:
            raise SurgeryError("This heal result has no saved step yet; train it before saving it.")
        record = self.patched.record.with_heal(self.history)
        return write_checkpoint(self.model, path, record, force, dtype=self.settings.dtype)


@dataclass
class HealRun:
    """A heal run ready to train (see :func:`prepare_heal`); :func:`train` trains it once."""

    patched: Patched  # the student: the patched model, on its device, trainable parts chosen
    settings: HealSettings
    output: Path
    history: dict[str, Any]  # the heal record so far: origin, teacher, settings, trainable count
    start: int  # the step training starts from (0, or that of the output being resumed)
    resumed: bool
    device: torch.device
    net: nn.Module  # the student as features and logits (DistributedDataParallel under torchrun)
    teacher: nn.Module  # the teacher as features and logits
    optimizer: torch.optim.Optimizer
    batches: Iterator[torch.Tensor]
    trainable: list[str]
    save_every: int = 0
    rank: int = 0
    world: int = 1
    leftovers: list[Path] = field(default_factory=list)  # temporaries of killed runs, removed

    @property
    def student(self) -> nn.Module:
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


# What heal compares: the feature maps and the logits (None for a backbone, which has none)
Distilled = tuple[list[torch.Tensor], torch.Tensor | None]


def _only_under(model: nn.Module, path: str, trainable: list[str]) -> list[str]:
    """Freeze every parameter of ``model`` outside ``path`` ('' : none) and return the
    ``trainable`` names left: heal distils a detection or segmentation model's backbone
    alone, so nothing else gets a gradient."""
    if not path:
        return trainable
    inside = [n for n in trainable if n.startswith(path + ".")]
    for name, p in model.named_parameters():
        if not name.startswith(path + "."):
            p.requires_grad_(False)
    return inside


def _backbone_holding(patched: Patched, student: nn.Module) -> str:
    """The part of ``student`` heal distils (``locate.backbone_path``); a SurgeryError where an
    ECA lies outside it (a detection or segmentation head): no loss would ever train it."""
    path = backbone_path(student)
    outside = [e.eca_path for e in patched.plan.edits if path and not e.eca_path.startswith(path + ".")]
    if outside:
        raise SurgeryError(
            f"heal distils the feature maps of {patched.model_name}'s backbone ({path!r}), but the ECA "
            f"at {outside[0]!r} lies outside it, where that loss cannot train it. Convert with ECA "
            "inside the backbone only (the eca-after-stages or eca-backbone-end recipes place it there)."
        )
    return path


class _FeaturesAndLogits(nn.Module):
    """Run a timm classifier as ``forward_features`` then ``forward_head``, returning both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Distilled:
        features = self.model.forward_features(x)
        return [features], self.model.forward_head(features)


class _PooledAndLogits(nn.Module):
    """Run a torchvision classifier, returning the map its ``avgpool`` takes (none if it has no
    ``avgpool`` or ``features`` is False) and its logits."""

    def __init__(self, model: nn.Module, features: bool) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, x: torch.Tensor) -> Distilled:
        maps: list[torch.Tensor] = []
        pool = self.model._modules.get("avgpool") if self.features else None
        hook = pool.register_forward_pre_hook(lambda m, a: maps.append(a[0])) if pool is not None else None
        try:
            logits = self.model(x)
        finally:
            if hook is not None:
                hook.remove()
        return maps, logits


class _BackboneMaps(nn.Module):
    """Run a torchvision detection or segmentation model's backbone, returning its feature maps."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> Distilled:
        out = self.backbone(x)
        return list(out.values()) if isinstance(out, dict) else [out], None


def distilled(model: nn.Module, feature_weight: float = 0.0) -> nn.Module:
    """``model`` as heal runs it, giving (feature maps, logits): a timm classifier's
    ``forward_features`` and logits; a torchvision classifier's pre-pool map (with
    ``feature_weight``) and logits; a torchvision detection or segmentation model's
    backbone feature maps, without logits."""
    path = backbone_path(model)
    if path:
        return _BackboneMaps(model.get_submodule(path))
    if is_torchvision(model):
        if feature_weight and not isinstance(model._modules.get("avgpool"), nn.Module):
            raise SurgeryError(
                f"`feature_weight` distils the map a classifier pools, but torchvision's "
                f"{type(model).__name__} has no `avgpool` module to take it from; distil its logits alone "
                "(`feature_weight=0`)."
            )
        return _PooledAndLogits(model, bool(feature_weight))
    return _FeaturesAndLogits(model)


def distillation_loss(
    student: Distilled, teacher: Distilled, temperature: float, feature_weight: float
) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, times T^2, plus
    ``feature_weight`` times the MSE of the feature maps; without logits (a backbone), the
    mean over the feature maps of their MSE."""
    (s_maps, s_logits), (t_maps, t_logits) = student, teacher
    if s_logits is None or t_logits is None:
        return _maps_mse(s_maps, t_maps)
    t = temperature
    loss = F.kl_div(
        F.log_softmax(s_logits.float() / t, 1),
        F.log_softmax(t_logits.float() / t, 1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    if feature_weight:
        loss = loss + feature_weight * _maps_mse(s_maps, t_maps)
    return loss


def _maps_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The mean over paired feature maps of their mean squared difference."""
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(losses).mean()


def build_teacher(
    name: str, checkpoint: str | Path | None, model_kwargs: dict[str, Any]
) -> tuple[nn.Module, str]:
    """The original model with its trained weights: from ``checkpoint``, else the library's
    pretrained weights (timm's from the Hugging Face cache, torchvision's from the hub cache)."""
    from .weights import pretrained_file

    if checkpoint is not None:
        path, source = Path(checkpoint), str(checkpoint)
    else:
        path, source = pretrained_file(name, "teacher_checkpoint")
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
                f"`device` {device!r} is not a device; use e.g. cpu, cuda or cuda:1."
            ) from None
        if dev.type == "cuda" and (
            not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
        ):
            raise SurgeryError(
                f"`device` {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) that torch "
                "can use; pick one of them or `device='cpu'`."
            )
        return _usable(dev, device)
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _usable(dev: torch.device, device: str) -> torch.device:
    """``dev`` if a tensor can be made on it and read back: ``meta`` holds no values, and torch
    names devices (``xpu``, ``mps``, ``hpu``) that this build or machine may not have."""
    try:
        torch.zeros(1, device=dev).cpu()
    except Exception as exc:  # each backend fails its own way (RuntimeError, AssertionError, ImportError)
        raise SurgeryError(
            f"`device` {device!r} cannot hold and return values here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); use e.g. cpu or cuda."
        ) from None
    return dev


def prepare_heal(
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
) -> HealRun:
    """Make a heal run ready: check the settings, inputs and outputs before any work, find
    the resume point, build the teacher, choose what trains, and make the optimizer (with a
    resumed run's state) and the batches. Nothing is written; :func:`train` runs it.

    The teacher is ``teacher`` (a timm name or ``torchvision:NAME``) with ``teacher_checkpoint``'s weights, by
    default the model and source weights ``patched_path`` records. ``resume`` continues
    the run that wrote ``output``; ``force`` replaces an existing ``output``;
    ``save_every`` also writes it every that many steps; ``device`` (default: the GPU if
    any) and ``workers`` (DataLoader processes) say where it runs."""
    check_loop_options(save_every, workers)
    dev = pick_device(device)
    output = Path(output)
    rank, world = _distributed()
    files = image_files(data)
    leftovers = _check_outputs(output, patched_path, resume, force, teacher_checkpoint, data)
    origin = _origin(patched_path, data, teacher, teacher_checkpoint)
    patched, history, opt_state = _starting_point(patched_path, output, settings, origin, resume, teacher)
    t_model, history["teacher_weights"] = _teacher_model(
        patched, patched_path, history, teacher, teacher_checkpoint
    )
    _check_per_step(settings, len(files) // world)
    settings = replace(settings, dtype=settings.dtype or dtype_of(patched.model))
    student = _for_training(patched.model).to(dev)
    trainable = select_trainable(student, [e.eca_path for e in patched.plan.edits], settings.train)
    trainable = _only_under(student, _backbone_holding(patched, student), trainable)
    optimizer = _optimizer(student, settings, opt_state, output)
    history.update(settings=settings.to_dict(), trainable=len(trainable))
    start = history["step"] if resume else 0
    dataset = ImageFiles(files, data_config(student, patched.model_name))
    batches = training_batches(
        dataset, settings.batch_size, settings.seed, start, rank, world, workers, dev.type == "cuda"
    )
    net: nn.Module = distilled(student, settings.feature_weight)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    teacher_net = distilled(_for_training(t_model).to(dev), settings.feature_weight)
    return HealRun(
        patched, settings, output, history, start, resume, dev, net, teacher_net, optimizer, batches,
        trainable, save_every, rank, world, leftovers,
    )  # fmt: skip


def _for_training(model: nn.Module) -> nn.Module:
    """``model`` in float32 if it is in half precision (float16, bfloat16): the loss, the
    gradients and AdamW's steps are then taken at full precision, as the input batches are."""
    return model.float() if float_dtype(model) in (torch.float16, torch.bfloat16) else model


def _origin(
    patched_path: str | Path, data: str | Path, teacher: str | None, teacher_checkpoint: str | Path | None
) -> dict[str, str]:
    """What a run starts from, which a resumed run must share: source, data and teacher."""
    origin = {"source": str(Path(patched_path).resolve()), "data": str(Path(data).resolve())}
    if teacher is not None:
        origin["teacher"] = teacher
    if teacher_checkpoint is not None:
        origin["teacher_weights"] = str(teacher_checkpoint)
    return origin


def _starting_point(
    patched_path: str | Path,
    output: Path,
    settings: HealSettings,
    origin: dict[str, str],
    resume: bool,
    teacher: str | None,
) -> tuple[Patched, dict[str, Any], dict[str, Any] | None]:
    """The model to train, the heal record so far and the optimizer state: the patched
    checkpoint and a fresh record, or (``resume``) the earlier output, its record and state."""
    if resume:
        check_resumable(output)
    patched = open_patched(output if resume else patched_path)
    heal_meta, opt_state = (
        resume_point(output, patched.record.provenance.heal, settings.to_dict(), settings.steps, origin)
        if resume
        else (None, None)
    )
    _check_classifier(patched.model, str(patched_path))
    if input_size(patched.model)[0] != 3:
        raise SurgeryError(
            f"heal reads its images as RGB, but {str(patched_path)!r} takes {input_size(patched.model)[0]} "
            "channel(s) (in_chans); heal it in your own training loop on inputs of that shape."
        )
    return patched, heal_meta or {"teacher": teacher or patched.model_name, **origin}, opt_state


def _teacher_model(
    patched: Patched,
    patched_path: str | Path,
    history: dict[str, Any],
    teacher: str | None,
    checkpoint: str | Path | None,
) -> tuple[nn.Module, str]:
    """The teacher the heal record names and where its weights came from: ``checkpoint``,
    the weights a resumed run began with, the file ``patched`` was converted from, or the
    library's pretrained weights."""
    name = history["teacher"]
    if checkpoint is None and "teacher_weights" in history and Path(history["teacher_weights"]).is_file():
        checkpoint = history["teacher_weights"]  # resuming: the teacher the run began with
    if checkpoint is None and teacher is None:
        checkpoint = _source_file(patched, patched_path)
    model, source = build_teacher(name, checkpoint, patched.model_kwargs)
    _check_classifier(model, f"teacher {name!r}")
    return model, source


def original_model(
    patched: Patched, patched_path: str | Path, teacher: str | None, checkpoint: str | Path | None
) -> tuple[nn.Module, str]:
    """The model ``patched`` was converted from, resolved as heal resolves its teacher (see
    :func:`_teacher_model`), in eval mode; and where its weights came from."""
    return _teacher_model(
        patched, patched_path, {"teacher": teacher or patched.model_name}, teacher, checkpoint
    )


def _check_per_step(settings: HealSettings, per_process: int) -> None:
    """Refuse BatchNorm training on steps of fewer than 2 images per process."""
    per_step = min(settings.batch_size, per_process)
    if settings.train != Train.ECA and per_step < 2:
        raise SurgeryError(
            f"Each step would see {per_step} image(s) per process, but `train='{settings.train.value}'` "
            "updates BatchNorm statistics, which needs at least 2; add images, raise `batch_size`, or use "
            "`train='eca'`."
        )


def _optimizer(
    student: nn.Module, settings: HealSettings, state: dict[str, Any] | None, output: Path
) -> torch.optim.Optimizer:
    """AdamW over the student's trainable parameters, with a resumed run's saved ``state``."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if state is not None:
        load_optimizer(opt, state["optimizer"], state_path(output))
    return opt


def train(run: HealRun, on_step: OnStep | None = None) -> HealResult:
    """Train ``run`` up to ``run.settings.steps`` and write its output (also every
    ``run.save_every`` steps, and on Ctrl-C or SIGTERM, which stop it between steps).
    ``on_step(step, steps, loss, images_per_s)`` is called after every step (on process 0).
    A loss or weights that stop being finite stop the run without saving them."""
    result = HealResult(
        run.patched, run.settings, run.start, run.start, rank=run.rank, leftovers=run.leftovers
    )
    saved: list[int] = [run.start] if run.resumed else []
    watched = [p for p in run.student.parameters() if p.requires_grad] + [
        b for m in run.student.modules() if m.training and is_norm(m) for b in m.buffers()
    ]
    steps, every = run.settings.steps, run.save_every
    torch.manual_seed(run.settings.seed + run.start)
    with _stop_requests() as stop:
        for step in range(run.start, steps):
            if stop:
                _stop(run, result, stop[0], saved)
            _train_step(run, result, step, watched, _last(saved))
            if on_step is not None and run.rank == 0:
                on_step(result.step, steps, result.losses[-1], result.images_per_s)
            if every and result.step % every == 0 and result.step < steps:
                _save_progress(run, result, saved)
    _save_progress(run, result, saved)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()  # every process returns only once process 0 has written the output
        dist.destroy_process_group()
    run.student.eval()
    return result


def _train_step(
    run: HealRun, result: HealResult, step: int, watched: list[torch.Tensor], saved: int | None
) -> None:
    """One optimizer step (``step`` counts from 0); refuses a non-finite loss or weights,
    naming ``saved``, the step of the output on disk."""
    s = run.settings
    tick = time.perf_counter()
    x = next(run.batches).to(run.device, non_blocking=True)
    with torch.no_grad():
        target = run.teacher(x)
    out = run.net(x)
    if step == run.start:
        _check_outputs_match(out, target)
    loss = distillation_loss(out, target, s.temperature, s.feature_weight)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _diverged(step + 1, f"the loss is {value}", s.lr, saved, run.output)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if not _all_finite(watched):
        raise _diverged(step + 1, "weights became NaN or infinite", s.lr, saved, run.output)
    result.step = step + 1
    result.losses.append(value)
    result.images_per_s = x.shape[0] * run.world / (time.perf_counter() - tick)


def _save_progress(run: HealRun, result: HealResult, saved: list[int]) -> None:
    """Write the run's output at ``result.step`` (on process 0) and note the step saved."""
    record = run.history | {
        "step": result.step,
        "loss_last": result.losses[-1] if result.losses else None,
        "loss_first": run.history.get("loss_first", result.losses[0] if result.losses else None),
    }
    result.history = record
    if run.rank == 0:
        _save(result, run.output, run.optimizer)
    saved.append(result.step)


def _stop(run: HealRun, result: HealResult, signal_name: str, saved: list[int]) -> NoReturn:
    """Save what finished (if a step did) and stop the run on ``signal_name``."""
    if result.step > run.start:
        _save_progress(run, result, saved)
        kept = f"; progress saved to {str(run.output)!r}. Run the same command with `resume=True` to continue"
    else:
        kept = ", before any step finished; nothing was written"
    raise StoppedBySignal(
        f"Interrupted ({signal_name}) after step {result.step} of {run.settings.steps}{kept}.", signal_name
    )


def heal(
    patched_path: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    on_step: OnStep | None = None,
    **options: Any,
) -> HealResult:
    """Distil ``teacher`` (by default the patched model's source architecture) into the
    patched checkpoint ``patched_path`` on the images under ``data``; write ``output``.

    ``options`` are those of :func:`prepare_heal`: ``teacher``, ``teacher_checkpoint``,
    ``settings`` (a :class:`HealSettings`), ``resume``, ``force``, ``save_every``,
    ``device``, ``workers``. With ``resume``, training continues from ``output`` (written
    by an earlier run with the same settings) up to ``settings.steps``. ``on_step(step,
    steps, loss, images_per_s)`` is called after every step (on process 0). ``save_every``
    also writes ``output`` every that many steps; an interrupt (Ctrl-C) writes it too, so
    ``resume`` can continue. This is :func:`prepare_heal` then :func:`train`.
    """
    return train(prepare_heal(patched_path, data, output, **options), on_step)


def check_loop_options(save_every: int, workers: int) -> None:
    """Refuse a negative ``save_every`` and a worker count outside 0..MAX_WORKERS."""
    if save_every < 0:
        raise SurgeryError(
            f"`save_every` must be 0 (save at the end only) or a number of steps, got {save_every}."
        )
    if not 0 <= workers <= MAX_WORKERS:
        raise SurgeryError(
            f"`workers` must be from 0 (load images in the main process) to {MAX_WORKERS}, got {workers}."
        )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (one device sync for all of them)."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    return not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def _diverged(step: int, what: str, lr: float, saved: int | None, output: Path) -> SurgeryError:
    """The error that stops a run whose loss or weights stopped being finite."""
    kept = (
        f"The last good state, from step {saved}, is in {str(output)!r}: resume from it with "
        "`resume=True` (and a lower `lr` into another `output`, or the same settings)."
        if saved is not None
        else "Nothing was written."
    )
    return SurgeryError(
        f"Healing diverged at step {step}: {what} (learning rate {lr:g} too high?). The diverged model "
        f"was not saved. {kept} Try a lower `lr`."
    )


def _source_file(patched: Patched, path: str | Path) -> Path | None:
    """The weights file ``patched`` was converted from, if it still exists; None for
    timm's or torchvision's pretrained weights; an error for a model converted from random
    weights."""
    source = patched.record.provenance.source
    if source.startswith(("timm pretrained", "torchvision pretrained")):
        return None
    if source and Path(source).is_file():
        return Path(source)
    raise SurgeryError(
        f"{str(path)!r} was converted from {source or 'unknown weights'!r}, which is not a file here; "
        "pass the original model's weights with `teacher_checkpoint='FILE'`."
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
    """Refuse a model heal cannot distil: neither a timm classifier nor a torchvision model."""
    if is_torchvision(model):
        return
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise SurgeryError(
            f"heal distils a classifier's logits, but {what} is not a timm classifier (a features_only "
            "model?). Heal the classifier checkpoint, then build features from it."
        )


def _check_outputs_match(student: Distilled, teacher: Distilled) -> None:
    """Refuse a teacher whose logits (or, for a backbone, feature maps) differ in shape."""
    (s_maps, s_logits), (t_maps, t_logits) = student, teacher
    s_shapes, t_shapes = [tuple(m.shape) for m in s_maps], [tuple(m.shape) for m in t_maps]
    if s_logits is None or t_logits is None or s_shapes != t_shapes:
        if s_logits is not t_logits or s_shapes != t_shapes:
            raise SurgeryError(
                f"heal distils the feature maps {s_shapes} of the patched model, but the teacher gives "
                f"{t_shapes}{'' if t_logits is None else ' and logits'}; pass the teacher the patched model "
                "was converted from."
            )
        return
    if s_logits.dim() != 2 or s_logits.shape != t_logits.shape:
        raise SurgeryError(
            f"heal distils logits, but the patched model gives {tuple(s_logits.shape)} and the teacher "
            f"{tuple(t_logits.shape)}; pass the teacher the patched model was converted from."
        )


def _save(result: HealResult, output: Path, opt: torch.optim.Optimizer) -> None:
    """Write the healed checkpoint (with ``result.history``) and its optimizer state
    together: both are replaced or, if either write fails, neither is and no temporary is
    left, so the state on disk always goes with the checkpoint on disk."""
    with written_together():
        result.save(output, force=True)
        write_state(output, result.step, opt)


def _check_outputs(
    output: Path,
    patched_path: str | Path,
    resume: bool,
    force: bool,
    teacher_checkpoint: str | Path | None = None,
    data: str | Path | None = None,
) -> list[Path]:
    """Refuse, before any work, outputs heal may not write: the healed checkpoint (which
    ``resume`` replaces) and its optimizer state, in a writable folder with room for a
    checkpoint as large as the patched one. Remove their temporaries left by killed runs
    and return those."""
    patched = Path(patched_path)
    st = stat_input(patched, "Checkpoint", CheckpointError)
    size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None
    check_file_output(output, force or resume, size)
    check_file_output(state_path(output), True)
    removed = clean_outputs(output, state_path(output))
    check_outputs_apart(
        {"output": output, "optimizer state": state_path(output)},
        {"patched checkpoint": patched, "teacher checkpoint": teacher_checkpoint, "data folder": data},
    )
    return removed
