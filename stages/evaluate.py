"""Stage `evaluate`: the best checkpoint on the test split, the only place the test split is read.

A model whose backbone is still exactly the pretrained one (strategy frozen, or a finetune run
whose best epoch was a head epoch) is scored on the cached test features: the features stage
already ran that backbone over the test images, so only the head runs here. Any other model runs
on the images.

Writes the test metrics (metrics/eval.json), every prediction with its class probabilities
(metrics/predictions.csv), the confusion matrix as a DVC plot and a picture, and two more pictures: a grid of test
images titled predicted vs true, and a gallery of the misclassified ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.cli import run_stage
from stages.data import ImageDataset, decode_size, eval_transform, make_loader, read_split
from stages.files import atomic_path, write_json_atomic
from stages.models import (Preprocessing, classifier_from_checkpoint, head_from_checkpoint, load_checkpoint,
                           pick_device)
from stages.params import EvaluateParams, load_params
from stages.paths import MODEL, RAW_DIR, features_file
from stages.plots import save_confusion_matrix, save_image_grid
from stages.predict import head_probabilities, predict, summarize

log = logging.getLogger("evaluate")

EVAL_JSON = Path("metrics/eval.json")
PREDICTIONS_CSV = Path("metrics/predictions.csv")
EVAL_DIR = Path("metrics/eval")
CONFUSION_CSV = EVAL_DIR / "confusion.csv"
GRID_PNG = EVAL_DIR / "predictions.png"
MISCLASSIFIED_PNG = EVAL_DIR / "misclassified.png"
CONFUSION_PNG = EVAL_DIR / "confusion.png"


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts of [true class, predicted class]."""
    return np.bincount(classes * y_true + y_pred, minlength=classes * classes).reshape(classes, classes)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def score_test_predictions(probs, labels, classes: list[str]) -> dict:
    # scikit-learn's accuracy, precision, recall and F1 (tests/test_evaluate.py checks they agree),
    # counted here from the confusion matrix: importing sklearn.metrics takes 1.5 s, a third of
    # this stage's time in a frozen experiment.
    loss, _ = summarize(probs, labels)
    y_true, y_pred = labels.numpy(), probs.argmax(1).numpy()
    confusion = confusion_counts(y_true, y_pred, len(classes))
    right, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    precision, recall = ratio(right, predicted), ratio(right, support)
    f1 = ratio(2 * right, support + predicted)
    return {
        "accuracy": float(right.sum() / len(y_true)),
        "macro_f1": float(f1.mean()),
        "loss": loss,
        "images": int(len(y_true)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
    }


def predictions_table(rows: pd.DataFrame, probs, classes: list[str]) -> pd.DataFrame:
    predicted = probs.argmax(1).numpy()
    table = pd.DataFrame({
        "path": rows["path"],
        "true": rows["class"],
        "predicted": [classes[i] for i in predicted],
        "probability": probs.max(1).values.numpy().round(6),
    })
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i].numpy().round(6)
    return table


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def save_pictures(table: pd.DataFrame, grid_images: int) -> None:
    def titled(rows: pd.DataFrame):
        return (
            [RAW_DIR / p for p in rows["path"]],
            [f"predicted: {p} ({q:.2f})\ntrue: {t}" for p, q, t in zip(rows["predicted"], rows["probability"], rows["true"])],
            ["tab:green" if p == t else "tab:red" for p, t in zip(rows["predicted"], rows["true"])],
        )

    save_image_grid(*titled(table.head(grid_images)), GRID_PNG, "test predictions (green: right, red: wrong)")
    wrong = table[table["predicted"] != table["true"]].sort_values("probability", ascending=False)
    save_image_grid(*titled(wrong.head(grid_images)), MISCLASSIFIED_PNG,
                    f"misclassified: {len(wrong)} of {len(table)} (most confident first)")


def usable_test_features(checkpoint: dict, rows: pd.DataFrame, tta: str) -> dict | None:
    """The cached test features, if they are exactly what the model's backbone gives on these rows."""
    path = features_file("test")
    if checkpoint["metrics"]["phase"] != "head" or not path.is_file():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    same_backbone = cached["pretrained_sha256"] == checkpoint.get("pretrained_sha256")
    same_images = cached["paths"] == rows["path"].tolist()
    has_views = "plain" in cached["views"] and (tta != "hflip" or "hflip" in cached["views"])
    return cached if same_backbone and same_images and has_views else None


def predict_test_split(checkpoint: dict, rows: pd.DataFrame, params: EvaluateParams):
    """Class probabilities and labels of the test rows, from cached features when they apply."""
    cached = usable_test_features(checkpoint, rows, params.tta)
    if cached is not None:
        log.info("the backbone is the pretrained one: scoring the head on the cached test features")
        return head_probabilities(head_from_checkpoint(checkpoint), cached, params.tta), cached["labels"]
    device = pick_device()
    model = classifier_from_checkpoint(checkpoint).to(device, memory_format=torch.channels_last)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    loader = make_loader(ImageDataset(rows, eval_transform(prep), decode_size(prep)), params.batch_size, None,
                         params.workers, device.type == "cuda", persistent=False)
    return predict(model, loader, device, params.tta, channels_last=True, desc="testing")


def main() -> None:
    params = load_params().evaluate
    checkpoint = load_checkpoint(MODEL)
    classes = checkpoint["classes"]
    rows = read_split("test")
    probs, labels = predict_test_split(checkpoint, rows, params)

    metrics = score_test_predictions(probs, labels, classes)
    metrics["tta"] = params.tta
    metrics["best_epoch"] = checkpoint["epoch"]
    write_json_atomic(EVAL_JSON, metrics)
    table = predictions_table(rows, probs, classes)
    write_csv(table, PREDICTIONS_CSV)
    write_csv(table[["true", "predicted"]].rename(columns={"true": "actual"}), CONFUSION_CSV)
    save_pictures(table, params.grid_images)
    confusion = confusion_counts(labels.numpy(), probs.argmax(1).numpy(), len(classes))
    save_confusion_matrix(confusion, classes, CONFUSION_PNG)
    log.info("test: accuracy %.4f, macro-F1 %.4f, loss %.4f on %d images (model from epoch %d)",
             metrics["accuracy"], metrics["macro_f1"], metrics["loss"], metrics["images"], checkpoint["epoch"])


if __name__ == "__main__":
    run_stage(main)
