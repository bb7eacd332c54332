"""Scores of predicted class probabilities against true labels, and the tables they come in.

Accuracy, precision, recall and F1 as scikit-learn computes them (tests/test_metrics.py checks
they agree), counted here from the confusion matrix: importing sklearn.metrics takes 1.5 s, a
third of the evaluate stage's time in a frozen experiment.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts of [true class, predicted class]."""
    return np.bincount(classes * y_true + y_pred, minlength=classes * classes).reshape(classes, classes)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> float:
    """Mean F1 over the classes (0 for a class never predicted nor present, as scikit-learn's
    zero_division=0 gives)."""
    confusion = confusion_counts(y_true, y_pred, classes)
    right = np.diag(confusion)
    return float(ratio(2 * right, confusion.sum(1) + confusion.sum(0)).mean())


def given_probabilities(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels]


def mean_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels: the cross-entropy of the probabilities."""
    return float(-np.log(np.maximum(given_probabilities(probs, labels), 1e-12)).mean())


def val_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Loss, accuracy and macro-F1 of an epoch on the val split: what picks the best epoch."""
    predicted = probs.argmax(1)
    return mean_loss(probs, labels), float((predicted == labels).mean()), macro_f1(labels, predicted, probs.shape[1])


def score_predictions(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[dict, pd.DataFrame]:
    """The headline scores (flat, numeric: what `dvc exp show` prints) and the per-class table."""
    loss = mean_loss(probs, labels)
    y_true, y_pred = labels, probs.argmax(1)
    confusion = confusion_counts(y_true, y_pred, len(classes))
    right, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    precision, recall = ratio(right, predicted), ratio(right, support)
    f1 = ratio(2 * right, support + predicted)
    headline = {
        "accuracy": float(right.sum() / len(y_true)),
        "macro_f1": float(f1.mean()),
        # mean recall over the classes the test split has: what accuracy would be if they were balanced
        "balanced_accuracy": float(recall[support > 0].mean()),
        "loss": loss,
        "images": int(len(y_true)),
    }
    curves = class_curves(probs, y_true)
    per_class = pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1,
                              "support": support.astype(int),
                              "roc_auc": [curves[c]["auc"] if c in curves else None for c in range(len(classes))],
                              "average_precision": [curves[c]["ap"] if c in curves else None
                                                    for c in range(len(classes))]})
    return headline, per_class


def positives_per_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At every distinct score, highest first, taken as the threshold: how many items are called
    positive, and how many of those truly are (ties move together)."""
    order = np.argsort(-scores, kind="stable")
    last_of_tie = np.r_[np.nonzero(np.diff(scores[order]))[0], len(scores) - 1]
    return last_of_tie + 1, np.cumsum(positive[order])[last_of_tie]


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every threshold, as scikit-learn's roc_curve
    (drop_intermediate=False)."""
    called, tp = positives_per_threshold(scores, positive)
    fp = called - tp
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every threshold, highest threshold first."""
    called, tp = positives_per_threshold(scores, positive)
    return tp / called, tp / max(positive.sum(), 1)


def class_curves(probs: np.ndarray, y_true: np.ndarray) -> dict[int, dict]:
    """Per class with both positives and negatives in the split: its one-vs-rest ROC and
    precision-recall curves, the area under the first and the average precision (as
    scikit-learn's roc_auc_score and average_precision_score)."""
    curves = {}
    for c in range(probs.shape[1]):
        positive = (y_true == c).astype(int)
        if positive.sum() in (0, len(positive)):
            continue
        fpr, tpr = roc_curve(probs[:, c], positive)
        precision, recall = precision_recall_curve(probs[:, c], positive)
        curves[c] = {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall,
                     "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),  # the trapezoid rule
                     "ap": float(np.sum(np.diff(np.r_[0, recall]) * precision))}
    return curves


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Every (true, predicted) pair of different classes with mistakes, the commonest first, with
    the share of the true class's test images it takes."""
    confusion = confusion_counts(y_true, y_pred, len(classes))
    rows = [(classes[t], classes[p], int(confusion[t, p]), float(confusion[t, p] / confusion[t].sum()))
            for t in range(len(classes)) for p in range(len(classes)) if t != p and confusion[t, p]]
    table = pd.DataFrame(rows, columns=["true", "predicted", "images", "share_of_true"])
    return table.sort_values(["images", "true", "predicted"], ascending=[False, True, True]).reset_index(drop=True)


def predictions_table(rows: pd.DataFrame, probs, classes: list[str]) -> pd.DataFrame:
    predicted = probs.argmax(1)
    table = pd.DataFrame({
        "path": rows["path"],
        "true": rows["class"],
        "predicted": [classes[i] for i in predicted],
        "probability": probs.max(1).round(6),
    })
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i].round(6)
    return table


def shown_predictions(table: pd.DataFrame, count: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test predictions the pictures show: the first `count` (the index is shuffled), and the
    `count` most confident misclassified ones."""
    wrong = table[table["predicted"] != table["true"]].sort_values("probability", ascending=False, kind="stable")
    return table.head(count), wrong.head(count)
