"""Stage `suspects`: which labels of train and val are probably wrong, and how many.

A head trained on all the images has fitted their labels, wrong ones included, so its own losses
miss the mislabelled images it memorised. Here heads train in `suspects.folds` folds over train +
val on the cached features of the pretrained backbone, with their own settings (the `suspects`
params: no train or model param reruns this audit), and each image is scored by the head that did
not see it; confident learning (lib/suspects.py) then estimates how many labels are wrong per
class pair and ranks the images most probably mislabelled. The features are the pretrained
backbone's whatever the strategy (a fine-tuned backbone's would need a network pass per fold).
Costs seconds: the heads train on cached features. An audit, run on request (audit/dvc.yaml).

Writes metrics/suspects.json (the estimated number of wrong labels, and the md5 of the index it
audited), metrics/suspects/summary.json (the share too, the suspects listed, the folds),
metrics/suspects/suspects.csv (ranked: path, split, given label, suggested label, the out-of-fold
probability of each), metrics/suspects/label_errors.csv (the estimate per given/true pair) and
metrics/suspects/suspects.png (the most suspect images).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from stages.lib.cli import run_stage
from stages.lib.features import read_features
from stages.lib.files import file_sha256, short_md5, write_csv_atomic, write_json_atomic
from stages.lib.folds import out_of_fold_probabilities
from stages.lib.index_table import read_classes
from stages.lib.params import load_params
from stages.lib.paths import (
    INDEX_CSV,
    RAW_DIR,
    SUSPECTS_CSV,
    SUSPECTS_METRICS,
    SUSPECTS_PAIRS_CSV,
    SUSPECTS_PNG,
    SUSPECTS_SUMMARY,
)
from stages.lib.plots import save_image_grid
from stages.lib.suspects import estimated_label_errors, label_suspects

log = logging.getLogger("suspects")
GALLERY = 16


def train_and_val() -> tuple[dict, list[str], list[str]]:
    """The train and val features as one split (the views both have), with each image's path and split."""
    train, val = read_features("train", in_memory=True), read_features("val", in_memory=True)
    views = [view for view in train["views"] if view in val["views"]]
    pick = lambda split: split["features"][:, [split["views"].index(v) for v in views]]  # noqa: E731
    merged = {"features": np.concatenate([pick(train), pick(val)]), "views": views,
              "labels": np.concatenate([train["labels"], val["labels"]]).astype(np.int64)}
    return merged, list(train["paths"]) + list(val["paths"]), ["train"] * len(train["labels"]) + ["val"] * len(
        val["labels"])


def suspects_table(probs: np.ndarray, labels: np.ndarray, paths: list[str], splits: list[str],
                   classes: list[str]) -> pd.DataFrame:
    images, suggested = label_suspects(probs, labels, len(classes))
    return pd.DataFrame({
        "path": [paths[i] for i in images], "split": [splits[i] for i in images],
        "given": [classes[labels[i]] for i in images], "suggested": [classes[s] for s in suggested],
        "probability_given": probs[images, labels[images]].round(6),
        "probability_suggested": probs[images, suggested].round(6),
    })


def pairs_table(errors: np.ndarray, classes: list[str]) -> pd.DataFrame:
    rows = [{"given": classes[g], "true": classes[t], "estimated_wrong_labels": round(float(errors[g, t]), 2)}
            for g in range(len(classes)) for t in range(len(classes)) if g != t]
    return pd.DataFrame(rows).sort_values("estimated_wrong_labels", ascending=False, kind="stable")


def warn_of_small_classes(labels: np.ndarray, classes: list[str], folds: int) -> None:
    """A class with fewer images than folds is held out in fewer folds than the others: its
    out-of-fold scores rest on heads that saw one image of it fewer, which matters on a class that small."""
    counts = np.bincount(labels, minlength=len(classes))
    small = [f"{classes[c]} ({counts[c]})" for c in np.flatnonzero(counts < folds)]
    if small:
        log.warning("suspects.folds %d: %d classes have fewer train + val images than folds: %s%s; their suspects "
                    "rest on few images", folds, len(small), ", ".join(small[:5]), ", ..." if len(small) > 5 else "")


def main() -> None:
    params = load_params()
    classes = read_classes()
    split, paths, splits = train_and_val()
    labels = split["labels"]
    warn_of_small_classes(labels, classes, params.suspects.folds)
    probs, folds = out_of_fold_probabilities(split, params, len(classes))
    errors = estimated_label_errors(probs, labels, len(classes))
    wrong = float(errors.sum() - np.trace(errors))
    table = suspects_table(probs, labels, paths, splits, classes)
    write_csv_atomic(SUSPECTS_CSV, table)
    write_csv_atomic(SUSPECTS_PAIRS_CSV, pairs_table(errors, classes))
    shown = table.head(GALLERY)
    save_image_grid([RAW_DIR / p for p in shown["path"]],
                    [f"{s}: given {g} ({q:.2f})\nsuggested {t} ({r:.2f})" for s, g, q, t, r in
                     zip(shown["split"], shown["given"], shown["probability_given"], shown["suggested"],
                         shown["probability_suggested"])],
                    ["tab:red"] * len(shown), SUSPECTS_PNG,
                    f"label suspects: {len(table)} images, about {wrong:.0f} labels estimated wrong (out-of-fold)")
    # An audit runs on request: its headline names the index it audited, so that no view shows it as
    # measured on an experiment's data when it was not (dvc.lock's md5 of data/index.csv).
    write_json_atomic(SUSPECTS_SUMMARY, {"label_errors_estimated": round(wrong, 1),
                                         "label_error_share": round(wrong / len(labels), 4),
                                         "suspects": int(len(table)), "folds": folds,
                                         "index_md5": file_sha256(INDEX_CSV, "md5")})
    write_json_atomic(SUSPECTS_METRICS, {"mislabelled": round(wrong, 1), "md5": short_md5(INDEX_CSV)})
    log.info("%d-fold heads on the pretrained backbone's cached features (train + val, %d images): about %.0f "
             "labels (%.1f%%) estimated wrong; %d suspects, most suspect first, in %s", folds, len(labels), wrong,
             100 * wrong / len(labels), len(table), SUSPECTS_CSV)


if __name__ == "__main__":
    run_stage(main)
