"""Stage `evaluate`: the best checkpoint on the test split, which no stage of the experiment loop
before it reads (the audit's heatmaps draw evaluate's test predictions, after the model is chosen).

A model whose backbone is still exactly the pretrained one (strategy frozen, or a finetune run
whose best epoch was a head epoch) is scored on the cached test features: the features stage
already ran that backbone over the test images, so only the head runs here, in numpy, without
importing torch (lib/head.py). Any other model runs on the images (lib/inference.py). Both in
full precision, with the model's own tta, and the probabilities are scaled by the temperature
train fitted on the val split.

Writes the headline test metrics, flat and few for `dvc exp show` (metrics/eval.json: accuracy,
macro-F1, calibration error) and with them the detail (metrics/eval/summary.json: 95% bootstrap
intervals, balanced accuracy, loss, calibration error before temperature scaling, Brier score);
every prediction with its class probabilities (metrics/predictions.csv); per-class scores with ROC
AUC and average precision, the most confused class pairs and the reliability bins
(metrics/eval/*.csv, DVC plots); and pictures: the confusion matrix, ROC and precision-recall
curves, the reliability diagram, a grid of test images titled predicted vs true, and a gallery of
the misclassified ones. The images whose labels are probably wrong are the audit's (the suspects
stage, audit/dvc.yaml): out-of-fold, unlike this model's in-sample losses, which miss the
mislabelled images it memorised.
"""

from __future__ import annotations

import logging

import pandas as pd

from stages.lib.calibration import brier_score, calibrate, expected_calibration_error, reliability_table
from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import run_stage
from stages.lib.features import split_probabilities
from stages.lib.files import write_csv_atomic, write_json_atomic
from stages.lib.index_table import read_split
from stages.lib.metrics import (
    class_curves,
    confused_pairs,
    confusion_counts,
    predictions_table,
    score_predictions,
    shown_predictions,
)
from stages.lib.params import load_params
from stages.lib.paths import (
    CLASS_CURVES_PNG,
    CONFUSED_PAIRS_CSV,
    CONFUSION_CSV,
    CONFUSION_PNG,
    EVAL_JSON,
    EVAL_SUMMARY,
    GRID_PNG,
    MISCLASSIFIED_PNG,
    MODEL,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
    RAW_DIR,
    RELIABILITY_CSV,
    RELIABILITY_PNG,
)
from stages.lib.plots import (
    prediction_titles,
    save_class_curves,
    save_confusion_matrix,
    save_image_grid,
    save_reliability_diagram,
)
from stages.lib.significance import RESAMPLES, bootstrap_intervals

log = logging.getLogger("evaluate")


def save_pictures(table: pd.DataFrame, grid_images: int) -> None:
    first, wrong = shown_predictions(table, grid_images)
    misclassified = int((table["predicted"] != table["true"]).sum())
    for rows, path, heading in ((first, GRID_PNG, "test predictions (green: right, red: wrong)"),
                                (wrong, MISCLASSIFIED_PNG,
                                 f"misclassified: {misclassified} of {len(table)} (most confident first)")):
        save_image_grid([RAW_DIR / p for p in rows["path"]], *prediction_titles(rows), path, heading)


HEADLINE = ("accuracy", "macro_f1", "ece")  # metrics/eval.json: what experiments are compared by


def summary_metrics(scores: dict, raw, probs, labels, classes: list[str]) -> dict:
    """What summary.json holds: flat numbers, the intervals beside their scores (the best epoch is
    train's metric, the temperature is in the checkpoint and the export sidecar)."""
    y_true, y_pred = labels, probs.argmax(1)
    intervals = bootstrap_intervals(y_true, y_pred, len(classes))
    return {
        "accuracy": scores["accuracy"],
        "accuracy_low": intervals["accuracy"][0],
        "accuracy_high": intervals["accuracy"][1],
        "macro_f1": scores["macro_f1"],
        "macro_f1_low": intervals["macro_f1"][0],
        "macro_f1_high": intervals["macro_f1"][1],
        "balanced_accuracy": scores["balanced_accuracy"],
        "loss": scores["loss"],
        "ece": expected_calibration_error(probs, y_true),
        "ece_uncalibrated": expected_calibration_error(raw, y_true),
        "brier": brier_score(probs, y_true),
        "images": scores["images"],
    }


def main() -> None:
    params = load_params().evaluate
    checkpoint = read_checkpoint(MODEL)
    rows = read_split("test")
    raw, labels = split_probabilities(checkpoint, "test", rows, params.batch_size, params.workers)
    probs = calibrate(raw, checkpoint.temperature)

    scores, per_class = score_predictions(probs, labels, checkpoint.classes)
    metrics = summary_metrics(scores, raw, probs, labels, checkpoint.classes)
    write_json_atomic(EVAL_SUMMARY, metrics)
    write_json_atomic(EVAL_JSON, {key: metrics[key] for key in HEADLINE})
    table = predictions_table(rows, probs, checkpoint.classes)
    write_csv_atomic(PREDICTIONS_CSV, table)
    write_csv_atomic(CONFUSION_CSV, table[["true", "predicted"]].rename(columns={"true": "actual"}))
    write_csv_atomic(PER_CLASS_CSV, per_class.round(6))
    y_true, y_pred = labels, probs.argmax(1)
    write_csv_atomic(CONFUSED_PAIRS_CSV, confused_pairs(y_true, y_pred, checkpoint.classes).round(6))
    calibrated = reliability_table(probs, y_true)
    write_csv_atomic(RELIABILITY_CSV, pd.DataFrame([r for r in calibrated if r["images"]]).round(6))
    series = {f"temperature {checkpoint.temperature:.3g}": (calibrated, metrics["ece"])}
    if checkpoint.temperature != 1.0:
        series["without temperature"] = reliability_table(raw, y_true), metrics["ece_uncalibrated"]
    save_reliability_diagram(series, RELIABILITY_PNG)
    save_class_curves(class_curves(probs, y_true), checkpoint.classes, CLASS_CURVES_PNG)
    save_pictures(table, params.grid_images)
    save_confusion_matrix(confusion_counts(y_true, y_pred, len(checkpoint.classes)), checkpoint.classes, CONFUSION_PNG)
    log.info("test: accuracy %.4f (95%% CI %.4f-%.4f, %d bootstrap resamples), macro-F1 %.4f, loss %.4f, ECE %.4f "
             "(%.4f before temperature %g) on %d images (model from epoch %d)", metrics["accuracy"],
             metrics["accuracy_low"], metrics["accuracy_high"], RESAMPLES, metrics["macro_f1"], metrics["loss"],
             metrics["ece"], metrics["ece_uncalibrated"], checkpoint.temperature, metrics["images"], checkpoint.epoch)


if __name__ == "__main__":
    run_stage(main)
