"""Where things are in a model: its backbone, timm's stages, the blocks of a stage, empty attention slots.

Stages are the modules that timm's ``feature_info`` names (the model's own notion of
its multi-scale stages); a features_only model also says which of them it returns.
"""

from __future__ import annotations

from torch import nn

from .models import dense_task

ATTN_SLOTS = ("se", "attn", "attention", "se_module")


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    return list(getattr(info, "info", info))


def _resolve(model: nn.Module, name: str) -> str | None:
    """The real path of a feature_info module name (features_only wrappers flatten '.' to '_')."""
    for path in (name, name.replace(".", "_")):
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def backbone_path(model: nn.Module) -> str:
    """The path of the feature extractor of a torchvision detection or segmentation model
    (a subclass included): ``backbone.body`` (torchvision's BackboneWithFPN), ``backbone``
    (segmentation models, SSD); else '' (the model itself). A user's own model with a
    ``backbone`` attribute gets '': nothing says that module takes the model's images."""
    backbone = model._modules.get("backbone")
    if dense_task(model) is None or not isinstance(backbone, nn.Module):
        return ""
    if isinstance(backbone._modules.get("body"), nn.Module) and isinstance(
        backbone._modules.get("fpn"), nn.Module
    ):
        return "backbone.body"
    return "backbone"


def stage_paths(model: nn.Module) -> list[str]:
    """The model's stages, in order, as module paths (from ``feature_info``)."""
    paths = [_resolve(model, d["module"]) for d in _feature_info(model)]
    return [p for p in paths if p is not None]


def is_features_only(model: nn.Module) -> bool:
    return hasattr(getattr(model, "feature_info", None), "out_indices")


def feature_branch_paths(model: nn.Module) -> list[str]:
    """Paths of the modules whose outputs a features_only model returns (its out_indices)."""
    if not is_features_only(model):
        return []
    paths = [_resolve(model, name) for name in model.feature_info.module_name()]
    return [p for p in paths if p is not None]


def block_paths(model: nn.Module, stage: str) -> list[str]:
    """The blocks of a stage: its ``blocks`` container's children, or the children of a
    container stage (Sequential, ModuleList, ModuleDict, RegStage, DenseBlock, ...).
    A stage that is a single layer (ResNet's ``act1``) has no blocks."""
    module = model.get_submodule(stage)
    prefix = f"{stage}." if stage else ""
    inner = getattr(module, "blocks", None)
    if isinstance(inner, (nn.Sequential, nn.ModuleList)):
        return [f"{prefix}blocks.{name}" for name, _ in inner.named_children()]
    return [f"{prefix}{name}" for name, child in module.named_children() if _has_params(child)]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def empty_slot(module: nn.Module) -> str | None:
    """The name of the module's empty attention slot (an ``se``/``attn`` attribute that is
    None or nn.Identity, as in timm blocks built without attention), else None."""
    return next((name for name in ATTN_SLOTS if is_empty_slot(module, name)), None)


def is_empty_slot(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has an attribute ``name`` (a child or a plain attribute) holding None
    or an nn.Identity, where an ECA block can go without replacing anything."""
    if name not in module._modules and name not in module.__dict__:
        return False
    value = getattr(module, name)
    return value is None or type(value) is nn.Identity


def is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own: it runs its children in order."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def runs_own_children(module: nn.Module) -> bool:
    """A container (Sequential, ModuleDict, ModuleList and their subclasses, such as
    DenseNet's DenseBlock or timm's FeatureListNet) may run every child it holds, so a
    child added to it would run where it must not."""
    return isinstance(module, (nn.Sequential, nn.ModuleDict, nn.ModuleList))
