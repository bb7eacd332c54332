"""Class probabilities from a trained model: the helpers train and evaluate share.

Everything here needs torch alone, so a stage that scores cached features starts quickly.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.cli import UserError


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy of predicted probabilities."""
    loss = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them a CPU emulates bf16 and runs autocast slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(device: torch.device, amp: bool):
    """Mixed precision: on CUDA bf16 where supported, else fp16 (with a GradScaler in training);
    on CPUs with native bf16, bf16; full precision elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if amp and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    format_ = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=format_)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
            channels_last: bool = False, desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels over a loader; with tta=hflip, averaged with the mirror image."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images = to_device(images, device, channels_last)
        with autocast(device, amp):
            probs = model(images).float().softmax(1)
            if tta == "hflip":
                probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
        all_probs.append(probs.cpu())
        all_labels.append(labels)
    return torch.cat(all_probs), torch.cat(all_labels)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
             channels_last: bool = False) -> tuple[float, float]:
    return summarize(*predict(model, loader, device, tta, amp, channels_last, desc="validating"))


@torch.inference_mode()
def head_probabilities(head: nn.Module, split: dict, tta: str) -> torch.Tensor:
    """Class probabilities from cached features: the plain view, averaged with the mirrored one
    for tta=hflip."""
    head.eval()
    probs = head(split["features"][:, split["views"].index("plain")]).softmax(1)
    if tta == "hflip":
        if "hflip" not in split["views"]:
            raise UserError("cached features lack the mirrored view that evaluate.tta=hflip needs; run dvc repro")
        probs = (probs + head(split["features"][:, split["views"].index("hflip")]).softmax(1)) / 2
    return probs
