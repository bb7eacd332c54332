"""Stage `suspects`: confident learning on out-of-fold heads finds the labels that are wrong."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from stages import suspects
from stages.lib.features import read_features, save_features
from stages.lib.suspects import confident_joint, estimated_label_errors, label_suspects


def noisy_dataset(seed: int = 0, images: int = 600, classes: int = 3, flipped_share: float = 0.1):
    """Out-of-sample probabilities that lean to each image's true class, and labels of which a
    share were flipped to another class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(classes, size=images)
    scores = rng.normal(size=(images, classes)) + 2.5 * np.eye(classes)[true]
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    flipped = rng.choice(images, int(flipped_share * images), replace=False)
    labels = true.copy()
    labels[flipped] = (true[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    return probs, labels, true, flipped


def test_the_confident_joint_counts_images_at_their_classes_thresholds():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 1])
    # thresholds: class 0 (0.9 + 0.7) / 2 = 0.8, class 1 (0.8 + 0.6 + 0.4) / 3 = 0.6
    assert confident_joint(probs, labels, 2).tolist() == [[1, 0], [0, 2]]  # 0.7 and 0.4 reach no threshold
    probs[4] = [0.85, 0.15]  # now confidently class 0 though labelled 1
    assert confident_joint(probs, labels, 2).tolist() == [[1, 0], [1, 2]]


def test_flipped_labels_are_found_and_counted():
    probs, labels, true, flipped = noisy_dataset()
    errors = estimated_label_errors(probs, labels, 3)
    assert errors.sum() == len(labels)  # calibrated to the labels' counts
    wrong = errors.sum() - np.trace(errors)
    assert 0.7 * len(flipped) <= wrong <= 1.3 * len(flipped)
    found, suggested = label_suspects(probs, labels, 3)
    top = found[: len(flipped)]
    recall = len(set(top) & set(flipped)) / len(flipped)
    assert recall >= 0.7, recall
    right = {int(i): int(true[i]) for i in flipped}
    hits = [s == right[int(i)] for i, s in zip(found, suggested) if int(i) in right]
    assert np.mean(hits) >= 0.9  # the suggested label is the true one
    confidence = probs[found, labels[found]]
    assert (np.diff(confidence) >= 0).all()  # the least self-confident first


def test_clean_labels_give_few_suspects():
    probs, labels, true, flipped = noisy_dataset(flipped_share=0.0)
    found, _ = label_suspects(probs, labels, 3)
    assert len(found) <= 0.05 * len(labels)


def test_the_stage_puts_flipped_labels_first(tiny_project):
    # a head that learns the tiny colours: enough epochs at a high rate
    root = tiny_project(strategy="frozen", suspects={"epochs": 40, "lr": 0.05, "label_smoothing": 0.0})
    train = read_features("train", in_memory=True)
    classes = json.loads((root / "data/classes.json").read_text())
    flipped = [0, 3]
    train["labels"] = train["labels"].copy()
    train["labels"][flipped] = 1 - train["labels"][flipped]
    save_features("train", train)
    suspects.main()
    table = pd.read_csv(root / "metrics/suspects/suspects.csv")
    assert set(table.path.head(2)) == {train["paths"][i] for i in flipped}
    first = table.iloc[0]
    assert first.split == "train" and first.given != first.suggested and first.suggested in classes
    assert first.probability_given < 0.5 < first.probability_suggested
    summary = json.loads((root / "metrics/suspects/summary.json").read_text())
    assert summary["suspects"] == len(table) and summary["label_errors_estimated"] >= 1
    headline = json.loads((root / "metrics/suspects.json").read_text())  # what `dvc metrics show` prints
    index_md5 = hashlib.md5((root / "data/index.csv").read_bytes()).hexdigest()
    assert headline == {"mislabelled": summary["label_errors_estimated"], "md5": index_md5[:7]}
    assert summary["index_md5"] == index_md5 and 2 <= summary["folds"] <= 5  # the folds that held images
    pairs = pd.read_csv(root / "metrics/suspects/label_errors.csv")
    assert len(pairs) == len(classes) * (len(classes) - 1)
    assert (root / "metrics/suspects/suspects.png").stat().st_size > 0


def test_more_folds_than_images_train_and_log_only_the_folds_used(tiny_project, caplog, monkeypatch):
    import logging

    from stages.lib import folds

    root = tiny_project(strategy="frozen", suspects={"folds": 100, "epochs": 2})
    images = sum(len(read_features(split, in_memory=True)["labels"]) for split in ("train", "val"))
    per_class = np.bincount(np.concatenate([read_features(s, in_memory=True)["labels"] for s in ("train", "val")]))
    classes = json.loads((root / "data/classes.json").read_text())
    trained = []
    real = folds.fit_head

    def counting(head, *args):
        trained.append(1)
        return real(head, *args)

    monkeypatch.setattr(folds, "fit_head", counting)
    with caplog.at_level(logging.INFO):
        suspects.main()
    assert len(trained) < 100 and len(trained) <= images
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"{len(trained)}-fold heads on the pretrained backbone's cached features (train + val, "
                               f"{images} images") for line in said), said
    warned = [line for line in said if line.startswith("suspects.folds 100:")]
    assert warned == [f"suspects.folds 100: {len(classes)} classes have fewer train + val images than folds: "
                      + ", ".join(f"{name} ({count})" for name, count in zip(classes, per_class))
                      + "; their suspects rest on few images"], said
