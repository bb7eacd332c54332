"""Near-duplicates across splits: the same photo re-encoded, resized or lightly cropped in train
and in test inflates the test score, the commonest leak in public image datasets.

Each image's pretrained-backbone features (the features stage's plain view) are centred on the
dataset's mean and compared by cosine similarity across splits. Centring matters: pooled CNN
features share a large common component, so raw cosines of distinct look-alike images (stained
blood cells) reach 0.93, above re-encoded copies of a photo (0.77); centred, distinct images stay
below about 0.76 and copies above about 0.83 (docs/stages.md, leaks).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLIT_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
BLOCK = 1024  # rows compared at once: memory stays at BLOCK x images, whatever the dataset's size


def plain_features(split: dict) -> np.ndarray:
    return split["features"][:, split["views"].index("plain")].astype(np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def cross_split_pairs(splits: dict[str, dict], threshold: float) -> pd.DataFrame:
    """Every pair of images in two different splits whose centred cosine similarity is at least
    `threshold`, most similar first: similarity, split_a, path_a, split_b, path_b."""
    mean = np.concatenate([plain_features(split) for split in splits.values()]).mean(0)
    unit = {name: unit_rows(plain_features(split) - mean) for name, split in splits.items()}
    rows = []
    for a, b in SPLIT_PAIRS:
        for start in range(0, len(unit[a]), BLOCK):
            similarity = unit[a][start:start + BLOCK] @ unit[b].T
            for i, j in zip(*np.nonzero(similarity >= threshold)):
                rows.append((round(float(similarity[i, j]), 4), a, splits[a]["paths"][start + i], b,
                             splits[b]["paths"][j]))
    table = pd.DataFrame(rows, columns=["similarity", "split_a", "path_a", "split_b", "path_b"])
    return table.sort_values(["similarity", "path_a", "path_b"], ascending=[False, True, True]).reset_index(drop=True)


def leak_summary(pairs: pd.DataFrame, threshold: float) -> dict:
    """The metric: how many pairs, and how many images of each split are in one."""
    involved = {split: int(pd.concat([pairs.loc[pairs.split_a == split, "path_a"],
                                      pairs.loc[pairs.split_b == split, "path_b"]]).nunique())
                for split in ("train", "val", "test")}
    return {"near_duplicates": len(pairs), "threshold": threshold, "images_in_pairs": involved}
