"""Where a model's backbone is, and its stages when timm's ``feature_info`` does not say.

torchvision's detection and segmentation models keep their feature extractor under
``backbone`` (``backbone.body`` when an FPN sits on top); that is where their SE blocks
live, and what placements and healing mean by the backbone.
"""

from __future__ import annotations

from torch import nn


def backbone_path(model: nn.Module) -> str:
    """The path of the model's feature extractor: ``backbone.body`` (torchvision's
    BackboneWithFPN), ``backbone`` (segmentation models, SSD), else '' (the model itself)."""
    backbone = model._modules.get("backbone")
    if not isinstance(backbone, nn.Module):
        return ""
    if isinstance(backbone._modules.get("body"), nn.Module) and isinstance(
        backbone._modules.get("fpn"), nn.Module
    ):
        return "backbone.body"
    return "backbone"
