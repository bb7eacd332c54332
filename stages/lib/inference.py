"""Class probabilities from a model: one loop, one test-time augmentation, one precision.

Every place that scores images (validation epochs in train, the test split in evaluate, the
predict command) goes through `batch_probabilities`, and every place that scores cached features
(head epochs, evaluate on a frozen model) through lib/head.py, in full precision: the best epoch
is picked on the same numbers that are reported, and the exported models (fp32) give what PyTorch
gives. Mixed precision is for training steps only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.lib.data import ImageDataset, decode_size, eval_transform, make_loader
from stages.lib.runtime import pick_device, to_device


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
                         desc: str = "predicting") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels over a loader of (images, labels), as numpy arrays."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        all_probs.append(batch_probabilities(model, images, device, tta, channels_last))
        all_labels.append(labels)
    return torch.cat(all_probs).numpy(), torch.cat(all_labels).numpy()


@torch.inference_mode()
def classify(model: nn.Module, loader, device: torch.device, tta: str):
    """Probabilities per readable file (a numpy array; None for the others) and each file's error."""
    model.eval()
    probs, errors = [], []
    for images, batch_errors in tqdm(loader, desc="predicting", unit="batch", disable=None):
        errors += batch_errors
        batch_probs = iter(batch_probabilities(model, images, device, tta).numpy() if images is not None else [])
        probs += [None if error else next(batch_probs) for error in batch_errors]
    return probs, errors


def image_probabilities(checkpoint, rows, batch_size: int, workers: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of index rows: the checkpoint's whole model on the images."""
    device = pick_device()
    model = checkpoint.classifier().to(device, memory_format=torch.channels_last)
    prep = checkpoint.preprocessing
    loader = make_loader(ImageDataset(rows, eval_transform(prep), decode_size(prep)), batch_size, None, workers,
                         device.type == "cuda", persistent=False)
    return loader_probabilities(model, loader, device, checkpoint.tta, desc=desc)
