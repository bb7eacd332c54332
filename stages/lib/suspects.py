"""Which given labels are probably wrong: confident learning (Northcutt, Jiang and Chuang,
"Confident learning: estimating uncertainty in dataset labels", JAIR 2021) on out-of-sample
class probabilities.

Written here, in numpy, rather than taken from cleanlab, which implements the same method: cleanlab
is AGPL-3.0, which a user who embeds this project in a product may not be able to accept, and the
method is a few dozen lines over arrays we already have.

- Each class's threshold is its average self-confidence: the mean probability of class j over the
  images labelled j.
- The confident joint counts, per (given label, true label) pair, the images whose probability of
  the true class reaches that class's threshold (the most probable such class, if several).
- Calibrated so that each row sums to that label's number of images, its off-diagonal estimates how
  many labels are wrong, per pair.
- The suspects are, for each pair (i, j), that many images labelled i with the largest margin
  p(j) - p(i) (pruning by noise rate), ranked by self-confidence p(given), lowest first.
"""

from __future__ import annotations

import numpy as np


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """The mean probability of each class over the images labelled with it (1 for an empty class:
    nothing reaches it)."""
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(classes)])


def confident_joint(probs: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Counts [given, true]: images labelled `given` whose most probable class among those at or
    above their threshold is `true`; an image above no threshold counts nowhere."""
    above = probs >= per_class_thresholds(probs, labels, classes)[None, :]
    masked = np.where(above, probs, -1.0)
    true = masked.argmax(1)
    counted = above.any(1)
    joint = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(joint, (labels[counted], true[counted]), 1)
    return joint


def estimated_label_errors(probs: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """The confident joint calibrated to the labels' counts: [given, true] = how many images
    labelled `given` are estimated to be `true`; the diagonal is the labels estimated right."""
    joint = confident_joint(probs, labels, classes).astype(float)
    given = np.bincount(labels, minlength=classes).astype(float)
    rows = joint.sum(1, keepdims=True)
    # A label no image confidently belongs to keeps its count on the diagonal (no evidence of errors)
    calibrated = np.where(rows > 0, joint / np.maximum(rows, 1) * given[:, None], np.diag(given))
    return calibrated


def label_suspects(probs: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the images whose label is probably wrong, most suspect first, and the label
    suggested for each."""
    errors = np.rint(estimated_label_errors(probs, labels, classes)).astype(int)
    chosen: dict[int, int] = {}  # image -> suggested label, the pair with the larger margin winning
    margin_of: dict[int, float] = {}
    for given in range(classes):
        mine = np.flatnonzero(labels == given)
        for true in range(classes):
            count = errors[given, true] if true != given else 0
            if count <= 0 or not len(mine):
                continue
            margins = probs[mine, true] - probs[mine, given]
            for index in np.argsort(-margins, kind="stable")[:count]:
                image, margin = int(mine[index]), float(margins[index])
                if margin > margin_of.get(image, -np.inf):
                    chosen[image], margin_of[image] = true, margin
    images = np.array(sorted(chosen), dtype=int)
    if not len(images):
        return images, images
    order = np.argsort(probs[images, labels[images]], kind="stable")
    return images[order], np.array([chosen[i] for i in images[order]], dtype=int)
