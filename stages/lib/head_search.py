"""The head's learning rate and weight decay, searched on the cached features (train.head_search).

Each setting of a small grid around train.lr and train.weight_decay trains a fresh head for the
head phase's epochs (train.head_epochs; fewer on a large dataset, train.head_max_steps), exactly
as the head phase would (the same initial weights, dropout and batch order), and is scored by its
best epoch on the val split: train.select_on, ties broken by lower val loss, then by the grid's
order. The head phase then trains with the winner, so its result is the winning trial's. A trial
takes a fraction of a second on cached features; the test split is never read. The network phase
of finetune keeps train.lr and train.weight_decay.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

import pandas as pd
import torch

from stages.lib.records import EpochResult

LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)  # times train.lr
WEIGHT_DECAY_FACTORS = (0.1, 1.0, 10.0)  # times train.weight_decay (0 stays 0)


@dataclass(frozen=True)
class Trial:
    lr: float
    weight_decay: float
    best: EpochResult  # the trial's best epoch on the val split


def search_grid(lr: float, weight_decay: float) -> list[tuple[float, float]]:
    decays = sorted({weight_decay * f for f in WEIGHT_DECAY_FACTORS})
    return [(lr * f, wd) for wd in decays for f in LR_FACTORS]


def search_head(new_head, fit, settings, select_on: str, timing: Counter) -> list[Trial]:
    """Every setting of the grid around `settings` (training.HeadSettings): `new_head()` makes a
    fresh head, `fit(head, settings, timing)` yields its epochs (records.Epoch) as training.fit_head
    does, its seconds kept apart from the head phase's. Torch's random state is as before."""
    started = time.perf_counter()
    trials = []
    with torch.random.fork_rng(devices=[]):
        state = torch.get_rng_state()
        for lr, weight_decay in search_grid(settings.lr, settings.weight_decay):
            torch.set_rng_state(state)  # each trial starts where the head phase will
            best = None
            for epoch in fit(new_head(), replace(settings, lr=lr, weight_decay=weight_decay), Counter()):
                if epoch.result.beats(best, select_on):
                    best = epoch.result
            trials.append(Trial(lr, weight_decay, best))
    timing["head_search"] += time.perf_counter() - started
    return trials


def winner(trials: list[Trial], select_on: str) -> Trial:
    best = trials[0]
    for trial in trials[1:]:
        if trial.best.beats(best.best, select_on):
            best = trial
    return best


def search_table(trials: list[Trial], chosen: Trial | None) -> pd.DataFrame:
    """A row per trial: metrics/train/head_search.csv, drawn by DVC as val score against lr."""
    return pd.DataFrame([{"lr": t.lr, "weight_decay": t.weight_decay, "best_epoch": t.best.epoch,
                          "val_accuracy": t.best.val_acc, "val_macro_f1": t.best.val_f1, "val_loss": t.best.val_loss,
                          "chosen": int(t is chosen)} for t in trials],
                        columns=["lr", "weight_decay", "best_epoch", "val_accuracy", "val_macro_f1", "val_loss",
                                 "chosen"])
