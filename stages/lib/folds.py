"""Out-of-fold class probabilities: heads trained on cached features in k folds, so that every
image is scored by a head that never saw it (and so never fitted its label, right or wrong).

The folds' heads train side by side, one per core the stage may use (lib/cores.py), each in a
process forked from the stage: a head trains on one torch thread (training.one_torch_thread), so
one process cannot use a second core. They are on the CPU, and the stage never touches CUDA
before forking; each fold's head is seeded by its fold, so its bits do not depend on which
process trains it or when (a test compares them with the heads trained one after another). The
processes end with the stage, even when it is killed.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from stages.lib.classifier import head_config, make_head
from stages.lib.cli import die_with_parent
from stages.lib.cores import cpu_threads
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


def fold_probabilities(split: dict, params: Params, fold: np.ndarray, k: int, classes: int) -> np.ndarray:
    """The class probabilities of fold k's images from a head trained on the other folds."""
    held, rest = subset(split, fold == k), subset(split, fold != k)
    torch.manual_seed(params.train.seed + k)
    head = make_head(split["features"].shape[-1], classes, **head_config(params.model))
    run = make_run(params, torch.device("cpu"), torch.from_numpy(rest["labels"]), classes)
    for _ in fit_head(head, rest, held, run, 1):
        pass
    return feature_probabilities(head_layers(head.state_dict()), held, params.model.tta)


# What the forked processes train on: set just before they fork, so that they share the features
# with the stage instead of receiving a pickled copy each.
_shared: tuple | None = None


def _die_with_the_stage(stage: int) -> None:
    """A head's process ends when the stage does, even by SIGKILL (as the stage ends with DVC)."""
    die_with_parent()
    if os.getppid() != stage:  # gone already, before the signal was set
        os._exit(1)


def _shared_fold_probabilities(k: int) -> np.ndarray:
    # One core per process: numpy's BLAS too (scoring the held-out fold), or two processes' BLAS
    # threads take turns on two cores (a third of the time lost at 2,000 images).
    with threadpool_limits(1):
        return fold_probabilities(*_shared[:3], k, _shared[3])


def out_of_fold_probabilities(split: dict, params: Params, folds: int, classes: int) -> np.ndarray:
    """Class probabilities of every image in `split` (cached features: features [images, views,
    width], labels, views) from a head trained with the run's head settings on the other folds,
    for all the head phase's epochs (no epoch is picked on the held-out fold: that would fit it)."""
    global _shared
    fold = stratified_folds(split["labels"], folds, params.train.seed)
    probs = np.zeros((len(split["labels"]), classes), dtype=np.float64)
    trained = [k for k in range(folds) if (fold == k).any()]
    processes = min(len(trained), cpu_threads())
    if processes <= 1:
        results = [fold_probabilities(split, params, fold, k, classes) for k in trained]
    else:
        _shared = (split, params, fold, classes)
        try:
            with multiprocessing.get_context("fork").Pool(processes, _die_with_the_stage, (os.getpid(),)) as pool:
                results = pool.map(_shared_fold_probabilities, trained, chunksize=1)
        finally:
            _shared = None
    for k, held_probs in zip(trained, results):
        probs[fold == k] = held_probs
    return probs
