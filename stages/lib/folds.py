"""Out-of-fold class probabilities: heads trained on cached features in k folds, so that every
image is scored by a head that never saw it (and so never fitted its label, right or wrong)."""

from __future__ import annotations

import numpy as np
import torch

from stages.lib.classifier import head_config, make_head
from stages.lib.head import feature_probabilities, head_layers
from stages.lib.params import Params
from stages.lib.training import fit_head, make_run


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


def out_of_fold_probabilities(split: dict, params: Params, folds: int, classes: int) -> tuple[np.ndarray, int]:
    """Class probabilities of every image in `split` (cached features: features [images, views,
    width], labels, views) from a head trained with the run's head settings on the other folds,
    for all the head phase's epochs (no epoch is picked on the held-out fold: that would fit it).
    Also the folds that held images (fewer than `folds` when there are fewer images): the heads trained."""
    fold = stratified_folds(split["labels"], folds, params.train.seed)
    probs = np.zeros((len(split["labels"]), classes), dtype=np.float64)
    width = split["features"].shape[-1]
    for k in range(folds):
        held, rest = subset(split, fold == k), subset(split, fold != k)
        if not len(held["labels"]):
            continue
        torch.manual_seed(params.train.seed + k)
        head = make_head(width, classes, **head_config(params.model))
        run = make_run(params, torch.device("cpu"), torch.from_numpy(rest["labels"]), classes)
        for _ in fit_head(head, rest, held, run, 1):
            pass
        probs[fold == k] = feature_probabilities(head_layers(head.state_dict()), held, params.model.tta)
    return probs, len(np.unique(fold))
