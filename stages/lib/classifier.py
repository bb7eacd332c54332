"""The classifier: a backbone that returns pooled features, and a new head for our classes."""

from __future__ import annotations

import torch
from torch import nn


def make_head(in_features: int, num_classes: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(hidden, num_classes),
    )


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def head_config(model_params) -> dict:
    """The head's shape as stored in checkpoints: `make_head`'s keyword arguments."""
    return {"kind": model_params.head, "hidden": model_params.hidden, "dropout": model_params.dropout}


def build_classifier(backbone_name: str, num_classes: int, head: dict) -> Classifier:
    from stages.lib.backbones import create_backbone, resolve_backbone

    backbone, width = create_backbone(resolve_backbone(backbone_name))
    return Classifier(backbone, make_head(width, num_classes, **head))


def prefixed(prefix: str, state: dict) -> dict:
    """A sub-module's state dict under the classifier's key names ("backbone.", "head.")."""
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in state.items()}


def unprefixed(prefix: str, state: dict) -> dict:
    """The part of a classifier's state dict that belongs to one sub-module, under its own names."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
