"""Stage `evaluate` (test metrics, predictions table, confusion plot data and pictures) and the
scores it computes (stages/lib/metrics.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages import evaluate
from stages.lib.checkpoint import read_checkpoint
from stages.lib.metrics import score_predictions as score_test_predictions
from tests.conftest import train_with_library


def test_scores_from_known_predictions():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    labels = np.array([0, 1, 1, 2])
    scores, per_class = score_test_predictions(probs, labels, ["a", "b", "c"])
    per_class = per_class.set_index("class")[["precision", "recall", "f1", "support"]].to_dict("index")
    assert scores["accuracy"] == pytest.approx(0.75)
    assert per_class["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert per_class["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    expected_loss = -np.log([0.9, 0.7, 0.3, 0.8]).mean()
    assert scores["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_scores_agree_with_scikit_learn():
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    generator = np.random.default_rng(0)
    # Five classes; class 3 is never predicted and class 4 never true, so zero divisions happen.
    labels = generator.integers(0, 4, 200)
    probs = generator.random((200, 5))
    probs[:, 3] = 0
    probs = probs / probs.sum(1, keepdims=True)
    classes = ["a", "b", "c", "d", "e"]
    scores, table = score_test_predictions(probs, labels, classes)
    per_class = table.set_index("class").to_dict("index")
    y_true, y_pred, ids = labels, probs.argmax(1), list(range(5))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0))
    for i, name in enumerate(classes):
        assert {k: per_class[name][k] for k in ("precision", "recall", "f1", "support")} == {
            "precision": pytest.approx(precision[i]), "recall": pytest.approx(recall[i]), "f1": pytest.approx(f1[i]),
            "support": support[i]}
        if i < 4:  # one class against the rest, where the test split has both
            positive = (y_true == i).astype(int)
            assert per_class[name]["roc_auc"] == pytest.approx(roc_auc_score(positive, probs[:, i]))
            assert per_class[name]["average_precision"] == pytest.approx(
                average_precision_score(positive, probs[:, i]))
    assert per_class["d"]["precision"] == 0 and per_class["e"]["support"] == 0
    assert per_class["e"]["roc_auc"] is None or pd.isna(per_class["e"]["roc_auc"])


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_evaluate_writes_metrics_predictions_and_pictures(tiny_project, tta):
    root = tiny_project(model={"tta": tta})
    train_with_library(root)
    evaluate.main()
    index = pd.read_csv(root / "data/index.csv")
    test_rows = index[index.split == "test"]
    predictions = pd.read_csv(root / "metrics/predictions.csv")
    assert list(predictions.columns) == ["path", "true", "predicted", "probability", "prob_blue", "prob_red"]
    assert predictions.path.tolist() == test_rows.path.tolist()
    assert (predictions.true == test_rows["class"].to_numpy()).all()
    assert predictions[["prob_blue", "prob_red"]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)

    metrics = json.loads((root / "metrics/eval/summary.json").read_text())
    assert list(metrics) == ["accuracy", "accuracy_low", "accuracy_high", "macro_f1", "macro_f1_low", "macro_f1_high",
                             "balanced_accuracy", "loss", "ece", "ece_uncalibrated", "brier", "images"]
    assert all(isinstance(value, (int, float)) for value in metrics.values())  # flat and numeric: dvc metrics diff
    headline = json.loads((root / "metrics/eval.json").read_text())  # what dvc exp show and metrics show print
    assert headline == {key: metrics[key] for key in ("accuracy", "macro_f1", "ece")}
    assert metrics["images"] == len(test_rows)
    assert metrics["accuracy"] == pytest.approx((predictions.true == predictions.predicted).mean())
    assert metrics["accuracy_low"] <= metrics["accuracy"] <= metrics["accuracy_high"]
    per_class = pd.read_csv(root / "metrics/eval/per_class.csv")
    assert per_class["class"].tolist() == ["blue", "red"] and per_class["support"].sum() == len(test_rows)
    reliability = pd.read_csv(root / "metrics/eval/reliability.csv")
    assert reliability["images"].sum() == len(test_rows)
    assert list(pd.read_csv(root / "metrics/eval/confused_pairs.csv").columns) == ["true", "predicted", "images",
                                                                                  "share_of_true"]

    confusion = pd.read_csv(root / "metrics/eval/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test_rows)
    for picture in ("predictions.png", "misclassified.png", "confusion.png", "curves.png", "reliability.png"):
        assert (root / "metrics/eval" / picture).read_bytes().startswith(b"\x89PNG")
    assert not (root / "metrics/eval/top_losses.csv").exists()  # the audit's suspects, out of fold, do that job


def test_a_frozen_model_is_scored_on_cached_features_as_on_images(tiny_project, caplog):
    root = tiny_project(strategy="frozen", model={"tta": "hflip"})
    train_with_library(root)
    with caplog.at_level("INFO"):
        evaluate.main()
    assert "scoring the head on the cached test features" in caplog.text
    from_features = pd.read_csv(root / "metrics/predictions.csv")
    (root / "data/features/test.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        evaluate.main()
    assert "cached test features" not in caplog.text
    from_images = pd.read_csv(root / "metrics/predictions.csv")
    assert from_images.path.tolist() == from_features.path.tolist()
    assert from_images.prob_red.to_numpy() == pytest.approx(from_features.prob_red.to_numpy(), abs=1e-4)


def test_cached_features_only_serve_the_backbone_they_came_from(trained_copy):
    from dataclasses import replace

    from stages.lib.features import usable_features

    checkpoint = read_checkpoint(trained_copy / "models/model.safetensors")
    paths = pd.read_csv(trained_copy / "data/index.csv").query("split == 'test'").path.tolist()
    assert checkpoint.pretrained_backbone_sha256 is not None
    assert usable_features(checkpoint, "test", paths) is not None
    assert usable_features(replace(checkpoint, tta="hflip"), "test", paths) is None  # no mirrored view cached
    trained_backbone = replace(checkpoint, pretrained_backbone_sha256=None)
    assert usable_features(trained_backbone, "test", paths) is None
    other_weights = replace(checkpoint, pretrained_backbone_sha256="0" * 64)
    assert usable_features(other_weights, "test", paths) is None
    assert usable_features(checkpoint, "test", paths[1:]) is None


def test_evaluate_without_a_model_says_what_to_do(tiny_project):
    tiny_project(run_features=False)
    from stages.lib.cli import UserError

    with pytest.raises(UserError, match=r"models/model.safetensors: not found; run the train stage first"):
        evaluate.main()


# --- uncertainty and calibration (lib/significance.py, lib/calibration.py) ------------------------


def test_bootstrap_intervals_are_seeded_and_cover_the_score():
    import numpy as np

    from stages.lib.significance import bootstrap_intervals

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 150)
    y_pred = np.where(rng.random(150) < 0.8, y_true, rng.integers(0, 3, 150))
    first = bootstrap_intervals(y_true, y_pred, 3, resamples=1000, seed=0)
    assert bootstrap_intervals(y_true, y_pred, 3, resamples=1000, seed=0) == first
    assert bootstrap_intervals(y_true, y_pred, 3, resamples=1000, seed=1) != first
    accuracy = (y_true == y_pred).mean()
    low, high = first["accuracy"]
    assert low < accuracy < high
    # A binomial proportion's normal-approximation interval, for comparison: within a point or two.
    half = 1.96 * (accuracy * (1 - accuracy) / 150) ** 0.5
    assert low == pytest.approx(accuracy - half, abs=0.02) and high == pytest.approx(accuracy + half, abs=0.02)
    f1_low, f1_high = first["macro_f1"]
    from sklearn.metrics import f1_score
    assert f1_low < f1_score(y_true, y_pred, average="macro") < f1_high


def test_mcnemar_exact_against_scipy_and_by_hand():
    from scipy.stats import binomtest

    from stages.lib.significance import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 2) == 1.0  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8, capped at 1
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * (1/2)^6
    for only_a, only_b in ((3, 12), (10, 11), (25, 9)):
        assert mcnemar_exact(only_a, only_b) == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_expected_calibration_error_nll_and_brier_by_hand():
    import numpy as np

    from stages.lib.calibration import (
        brier_score,
        expected_calibration_error,
        negative_log_likelihood,
        reliability_table,
    )

    # Four images: two at confidence 0.9 (one right), two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # Bins of 1/15: 0.9 falls in bin 13, 0.6 in bin 9. ECE = 2/4 |0.5 - 0.9| + 2/4 |1.0 - 0.6| = 0.4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    used = [row for row in reliability_table(probs, labels) if row["images"]]
    assert [(row["images"], row["accuracy"]) for row in used] == [(2, 1.0), (2, 0.5)]
    assert negative_log_likelihood(probs, labels) == pytest.approx(-np.log([0.9, 0.1, 0.6, 0.6]).mean())
    assert brier_score(probs, labels) == pytest.approx(np.mean([0.02, 1.62, 0.32, 0.32]))


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model_and_keeps_its_answers():
    import numpy as np

    from stages.lib.calibration import expected_calibration_error, fit_temperature, negative_log_likelihood, softmax

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), labels] += 1.5  # about 70% right...
    overconfident = logits * 4  # ...but sure of every answer
    temperature = fit_temperature(overconfident, labels)
    assert 2 < temperature < 6  # near the factor the logits were blown up by
    before, after = softmax(overconfident), softmax(overconfident / temperature)
    assert negative_log_likelihood(after, labels) < 0.7 * negative_log_likelihood(before, labels)
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels) / 2
    assert (after.argmax(1) == before.argmax(1)).all()
    assert fit_temperature(overconfident, labels) == temperature  # deterministic
    # Every image right and confident: the NLL keeps falling as T shrinks; the range stops it.
    assert fit_temperature(np.array([[1.0, 0.0]] * 4), np.zeros(4, dtype=int)) == pytest.approx(0.1, rel=1e-3)
