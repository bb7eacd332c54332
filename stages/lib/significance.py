"""How sure a score is, and whether two models differ: percentile bootstrap intervals over the
test images, a paired bootstrap of the accuracy difference, and McNemar's exact test.

One test image of hymenoptera is 0.65 points of accuracy: a difference of one or two images
between two runs is noise, and these say so.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 0
CHUNK = 250  # resamples drawn at once: memory stays at CHUNK x images


def resample_indices(n: int, resamples: int, seed: int):
    """Chunks of bootstrap index rows, (chunk, n) each: the same rows for the same seed."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, resamples - start), n))


def macro_f1_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 of each row of a (resamples, n) pair of label arrays, as lib/metrics.macro_f1."""
    rows = y_true.shape[0]
    codes = (np.arange(rows)[:, None] * classes * classes + classes * y_true + y_pred).ravel()
    confusion = np.bincount(codes, minlength=rows * classes * classes).reshape(rows, classes, classes)
    right = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(2) + confusion.sum(1)
    f1 = np.divide(2 * right, denominator, out=np.zeros(right.shape), where=denominator > 0)
    return f1.mean(1)


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, classes: int, resamples: int = RESAMPLES,
                        seed: int = SEED, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of accuracy and macro-F1 over test images drawn with replacement."""
    accuracy, f1 = [], []
    for rows in resample_indices(len(y_true), resamples, seed):
        t, p = y_true[rows], y_pred[rows]
        accuracy.append((t == p).mean(1))
        f1.append(macro_f1_rows(t, p, classes))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {name: tuple(float(v) for v in np.percentile(np.concatenate(values), tails))
            for name, values in (("accuracy", accuracy), ("macro_f1", f1))}


def paired_bootstrap_difference(right_a: np.ndarray, right_b: np.ndarray, resamples: int = RESAMPLES,
                                seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Interval of accuracy(B) - accuracy(A), both scored on the same resampled images."""
    difference = right_b.astype(float) - right_a.astype(float)
    means = np.concatenate([difference[rows].mean(1) for rows in resample_indices(len(difference), resamples, seed)])
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant images (right under one model only) as a
    binomial with p = 1/2 under the hypothesis that the models are equally good."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
