"""Stage `evaluate`: the best checkpoint on the test split, the only place the test split is read.

A model whose backbone is still exactly the pretrained one (strategy frozen, or a finetune run
whose best epoch was a head epoch) is scored on the cached test features: the features stage
already ran that backbone over the test images, so only the head runs here. Any other model runs
on the images. Both go through lib/inference.py, in full precision, with the model's own tta.

Writes the test metrics (metrics/eval.json), every prediction with its class probabilities
(metrics/predictions.csv), the confusion matrix as a DVC plot and a picture, and two more
pictures: a grid of test images titled predicted vs true, and a gallery of the misclassified ones.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from stages.lib.checkpoint import Checkpoint, read_checkpoint
from stages.lib.cli import run_stage
from stages.lib.data import ImageDataset, decode_size, eval_transform, make_loader, read_split
from stages.lib.features import usable_test_features
from stages.lib.files import atomic_path, write_json_atomic
from stages.lib.inference import feature_probabilities, loader_probabilities
from stages.lib.metrics import confusion_counts, predictions_table, score_predictions
from stages.lib.params import EvaluateParams, load_params
from stages.lib.paths import (CONFUSION_CSV, CONFUSION_PNG, EVAL_JSON, GRID_PNG, MISCLASSIFIED_PNG, MODEL,
                              PREDICTIONS_CSV, RAW_DIR)
from stages.lib.plots import save_confusion_matrix, save_image_grid
from stages.lib.runtime import pick_device

log = logging.getLogger("evaluate")


def predict_test_split(checkpoint: Checkpoint, rows: pd.DataFrame, params: EvaluateParams):
    """Class probabilities and labels of the test rows, from cached features when they apply."""
    cached = usable_test_features(checkpoint, rows["path"].tolist())
    if cached is not None:
        log.info("the backbone is the pretrained one: scoring the head on the cached test features")
        return feature_probabilities(checkpoint.head_module(), cached, checkpoint.tta), cached["labels"]
    device = pick_device()
    model = checkpoint.classifier().to(device, memory_format=torch.channels_last)
    prep = checkpoint.preprocessing
    loader = make_loader(ImageDataset(rows, eval_transform(prep), decode_size(prep)), params.batch_size, None,
                         params.workers, device.type == "cuda", persistent=False)
    return loader_probabilities(model, loader, device, checkpoint.tta, desc="testing")


def write_csv(table: pd.DataFrame, path) -> None:
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


def main() -> None:
    params = load_params().evaluate
    checkpoint = read_checkpoint(MODEL)
    rows = read_split("test")
    probs, labels = predict_test_split(checkpoint, rows, params)

    metrics = score_predictions(probs, labels, checkpoint.classes)
    write_json_atomic(EVAL_JSON, {**metrics, "tta": checkpoint.tta, "best_epoch": checkpoint.epoch})
    table = predictions_table(rows, probs, checkpoint.classes)
    write_csv(table, PREDICTIONS_CSV)
    write_csv(table[["true", "predicted"]].rename(columns={"true": "actual"}), CONFUSION_CSV)
    save_pictures(table, params.grid_images)
    confusion = confusion_counts(labels.numpy(), probs.argmax(1).numpy(), len(checkpoint.classes))
    save_confusion_matrix(confusion, checkpoint.classes, CONFUSION_PNG)
    log.info("test: accuracy %.4f, macro-F1 %.4f, loss %.4f on %d images (model from epoch %d)",
             metrics["accuracy"], metrics["macro_f1"], metrics["loss"], metrics["images"], checkpoint.epoch)


if __name__ == "__main__":
    run_stage(main)
