"""Optimizers and learning-rate schedules, stepped once per batch."""

from __future__ import annotations

import math

import torch

from stages.lib.params import TrainParams


def build_optimizer(groups: list[dict], params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=params.momentum, weight_decay=params.weight_decay)
    if params.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=params.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay)


def one_cycle(total: int, warmup: float = 0.25, start: float = 0.04):
    """The one-cycle shape as a factor of each group's lr: linear warm-up from `start` over the
    first quarter, then cosine annealing to zero. torch's OneCycleLR divides by zero on runs of a
    few steps, which tiny datasets produce."""
    warm = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return start + (1 - start) * step / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int, epochs: int):
    total = steps_per_epoch * epochs
    if params.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, params.step_size * steps_per_epoch, params.gamma)
    if params.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if params.scheduler == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
