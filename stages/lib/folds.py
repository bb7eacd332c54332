"""Out-of-fold class probabilities: heads trained on cached features in k folds, so that every
image is scored by a head that never saw it (and so never fitted its label, right or wrong)."""

from __future__ import annotations

import numpy as np
import torch

from stages.lib.classifier import make_head
from stages.lib.head import feature_probabilities, head_layers
from stages.lib.params import Params, SuspectsParams
from stages.lib.training import HeadSettings, Run, fit_head


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0..folds-1: every class dealt round the folds in a seeded order, so each
    fold holds about 1/folds of every class."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def subset(split: dict, keep: np.ndarray) -> dict:
    return {**split, "features": split["features"][keep], "labels": split["labels"][keep]}


def fold_head_settings(suspects: SuspectsParams) -> HeadSettings:
    """The suspects' heads: their own params (scored on the plain view: the held-out fold's images as they are)."""
    return HeadSettings(lr=suspects.lr, weight_decay=suspects.weight_decay, epochs=suspects.epochs,
                        max_steps=suspects.max_steps, batch_size=suspects.batch_size,
                        label_smoothing=suspects.label_smoothing, seed=suspects.seed, tta="none")


def out_of_fold_probabilities(split: dict, params: Params, classes: int) -> tuple[np.ndarray, int]:
    """Class probabilities of every image in `split` (cached features: features [images, views,
    width], labels, views) from a head trained with the suspects' head settings on the other
    folds, for all their epochs (no epoch is picked on the held-out fold: that would fit it).
    Also the folds that held images (fewer than suspects.folds when there are fewer images): the
    heads trained."""
    suspects = params.suspects
    settings = fold_head_settings(suspects)
    fold = stratified_folds(split["labels"], suspects.folds, suspects.seed)
    probs = np.zeros((len(split["labels"]), classes), dtype=np.float64)
    width = split["features"].shape[-1]
    for k in range(suspects.folds):
        held, rest = subset(split, fold == k), subset(split, fold != k)
        if not len(held["labels"]):
            continue
        torch.manual_seed(suspects.seed + k)
        head = make_head(width, classes, "linear", 0, suspects.dropout)
        for _ in fit_head(head, rest, held, Run(params, torch.device("cpu"), classes), 1, settings):
            pass
        probs[fold == k] = feature_probabilities(head_layers(head.state_dict()), held, settings.tta)
    return probs, len(np.unique(fold))
