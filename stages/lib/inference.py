"""Class probabilities from a model: one loop, one test-time augmentation, one precision.

Every place that scores images (validation epochs in train, the test split in evaluate, the
predict command) and every place that scores cached features (head epochs, evaluate on a frozen
model) goes through `batch_probabilities` or `feature_probabilities`, in full precision: the
best epoch is picked on the same numbers that are reported, and the exported models (fp32)
give what PyTorch gives. Mixed precision is for training steps only.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from stages.lib.cli import UserError
from stages.lib.runtime import to_device


def batch_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device, tta: str,
                        channels_last: bool = True) -> torch.Tensor:
    """Softmax of one batch on `device`, averaged with the mirror image for tta=hflip; on the CPU."""
    images = to_device(images, device, channels_last)
    probs = model(images).float().softmax(1)
    if tta == "hflip":
        probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
    return probs.cpu()


@torch.inference_mode()
def loader_probabilities(model: nn.Module, loader, device: torch.device, tta: str, channels_last: bool = True,
                         desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels over a loader of (images, labels)."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        all_probs.append(batch_probabilities(model, images, device, tta, channels_last))
        all_labels.append(labels)
    return torch.cat(all_probs), torch.cat(all_labels)


@torch.inference_mode()
def feature_probabilities(head: nn.Module, split: dict, tta: str) -> torch.Tensor:
    """Class probabilities from cached features (features.py): the plain view, averaged with the
    mirrored one for tta=hflip, as `batch_probabilities` does on images."""
    head.eval()
    views = split["views"]
    probs = head(split["features"][:, views.index("plain")]).softmax(1)
    if tta == "hflip":
        if "hflip" not in views:
            raise UserError("cached features lack the mirrored view that model.tta=hflip needs; run dvc repro")
        probs = (probs + head(split["features"][:, views.index("hflip")]).softmax(1)) / 2
    return probs


@torch.inference_mode()
def classify(model: nn.Module, loader, device: torch.device, tta: str):
    """Probabilities per readable file (None for the others) and each file's error."""
    model.eval()
    probs, errors = [], []
    for images, batch_errors in tqdm(loader, desc="predicting", unit="batch", disable=None):
        errors += batch_errors
        batch_probs = iter(batch_probabilities(model, images, device, tta) if images is not None else [])
        probs += [None if error else next(batch_probs) for error in batch_errors]
    return probs, errors


def calibrate(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled probabilities: softmax(log p / T), the same as softmax(logits / T)
    without test-time augmentation; the most probable class does not change."""
    if temperature == 1.0:
        return probs
    return (probs.clamp_min(1e-12).log() / temperature).softmax(1)


def loss_and_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy of predicted probabilities."""
    loss = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()
