"""Optimizers and learning-rate schedules, stepped once per batch."""

from __future__ import annotations

import math

import torch


def build_optimizer(groups: list[dict], params) -> torch.optim.Optimizer:
    """`params`: the train params, or a head's settings (training.HeadSettings): optimizer,
    momentum and weight_decay."""
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


def build_scheduler(optimizer: torch.optim.Optimizer, params, steps_per_epoch: int, epochs: int):
    """`params`: as build_optimizer's; scheduler, step_size and gamma."""
    total = steps_per_epoch * epochs
    if params.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, params.step_size * steps_per_epoch, params.gamma)
    if params.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if params.scheduler == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class LinearToZero:
    """train.time_budget's schedule, as a factor of each group's lr: one-cycle's warm-up (from
    0.04 over the first quarter of the steps: without it, AdamW's first steps at the full rate
    wreck a pretrained backbone, as bench.budget found on blood cells), then falling linearly to
    zero at the last planned step, the decay Li, Yumer and Ramanan found best for a fixed budget
    ("Budgeted training", ICLR 2020). Until `plan(total)` sets the number of steps, the factor stays
    at the warm-up's start (the first steps time the pace); `total` only bounds the steps till then.
    A callable object, not a function, so that LambdaLR saves its plan with the scheduler
    (resuming keeps it)."""

    def __init__(self, total: int, warmup: float = 0.25, start: float = 0.04):
        self.warmup, self.start, self.planned = warmup, start, False
        self.shape(total)

    def __call__(self, step: int) -> float:
        if not self.planned:  # the pace is being timed: the warm-up's start
            return self.start
        if step < self.warm:
            return self.start + (1 - self.start) * step / self.warm
        # from the last (re)plan's step and factor, linearly to zero at the last step
        return max(0.0, self.from_factor * (self.total - step) / max(1, self.total - self.from_step))

    def plan(self, total: int) -> None:
        self.shape(total)
        self.planned = True

    def replan(self, total: int, step: int) -> None:
        """After the warm-up, a new last step: the rate falls on from where it is at `step` (no jump),
        linearly to zero at `total`."""
        self.from_factor, self.from_step = self(step), step
        self.total = max(step + 1, total)

    def shape(self, total: int) -> None:
        self.total = max(1, total)
        self.warm = max(1, round(self.total * self.warmup))
        self.from_step, self.from_factor = self.warm, 1.0
