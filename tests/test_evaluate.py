"""Stage `evaluate` (test metrics, predictions table, confusion plot data and pictures) and the
scores it computes (stages/lib/metrics.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from stages import evaluate
from stages.lib.checkpoint import read_checkpoint
from stages.lib.metrics import score_predictions as score_test_predictions
from tests.conftest import train_with_library


def test_scores_from_known_predictions():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    scores = score_test_predictions(probs, labels, ["a", "b", "c"])
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert scores["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    expected_loss = -(torch.log(torch.tensor([0.9, 0.7, 0.3, 0.8]))).mean().item()
    assert scores["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_scores_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    # Five classes; class 3 is never predicted and class 4 never true, so zero divisions happen.
    labels = torch.randint(0, 4, (200,), generator=generator)
    probs = torch.rand(200, 5, generator=generator)
    probs[:, 3] = 0
    probs = probs / probs.sum(1, keepdim=True)
    classes = ["a", "b", "c", "d", "e"]
    scores = score_test_predictions(probs, labels, classes)
    y_true, y_pred, ids = labels.numpy(), probs.argmax(1).numpy(), list(range(5))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0))
    for i, name in enumerate(classes):
        assert scores["per_class"][name] == {"precision": pytest.approx(precision[i]), "recall": pytest.approx(recall[i]),
                                             "f1": pytest.approx(f1[i]), "support": support[i]}
    assert scores["per_class"]["d"]["precision"] == 0 and scores["per_class"]["e"]["support"] == 0


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

    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert metrics["images"] == len(test_rows) and metrics["tta"] == tta
    assert metrics["accuracy"] == pytest.approx((predictions.true == predictions.predicted).mean())
    assert set(metrics["per_class"]) == {"blue", "red"}
    assert metrics["best_epoch"] == torch.load(root / "models/model.pt", weights_only=True)["epoch"]

    confusion = pd.read_csv(root / "metrics/eval/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test_rows)
    for picture in ("predictions.png", "misclassified.png", "confusion.png"):
        assert (root / "metrics/eval" / picture).read_bytes().startswith(b"\x89PNG")


def test_a_frozen_model_is_scored_on_cached_features_as_on_images(tiny_project, caplog):
    root = tiny_project(strategy="frozen", model={"tta": "hflip"})
    train_with_library(root)
    with caplog.at_level("INFO"):
        evaluate.main()
    assert "scoring the head on the cached test features" in caplog.text
    from_features = pd.read_csv(root / "metrics/predictions.csv")
    (root / "data/features/test.pt").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        evaluate.main()
    assert "cached test features" not in caplog.text
    from_images = pd.read_csv(root / "metrics/predictions.csv")
    assert from_images.path.tolist() == from_features.path.tolist()
    assert from_images.prob_red.to_numpy() == pytest.approx(from_features.prob_red.to_numpy(), abs=1e-4)


def test_cached_features_only_serve_the_backbone_they_came_from(trained_copy):
    from dataclasses import replace

    from stages.lib.features import usable_test_features

    checkpoint = read_checkpoint(trained_copy / "models/model.pt")
    paths = pd.read_csv(trained_copy / "data/index.csv").query("split == 'test'").path.tolist()
    assert checkpoint.pretrained_backbone_sha256 is not None
    assert usable_test_features(checkpoint, paths) is not None
    assert usable_test_features(replace(checkpoint, tta="hflip"), paths) is None  # no mirrored view cached
    trained_backbone = replace(checkpoint, pretrained_backbone_sha256=None)
    assert usable_test_features(trained_backbone, paths) is None
    other_weights = replace(checkpoint, pretrained_backbone_sha256="0" * 64)
    assert usable_test_features(other_weights, paths) is None
    assert usable_test_features(checkpoint, paths[1:]) is None


def test_evaluate_without_a_model_says_what_to_do(tiny_project):
    tiny_project(run_features=False)
    from stages.lib.cli import UserError

    with pytest.raises(UserError, match=r"models/model.pt: not found; run the train stage first"):
        evaluate.main()
