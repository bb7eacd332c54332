"""Classes named by numbers, from a labels CSV whose labels are integers: every stage of every
pipeline keeps them as the strings they are ("02" is not the class 2). The same names as class
folders run through `dvc repro --all-pipelines` in tests/test_pipeline.py."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from tests.conftest import write_gradient_image

NAMES = ("0", "1", "10", "02")


@pytest.mark.slow  # every stage after download, in this process
def test_a_labels_csv_of_integer_labels_runs_every_stage_of_every_pipeline(tiny_project, tmp_path):
    from stages import evaluate, export, export_backbone, features, heatmaps, index, latency, leaks, suspects, train
    from stages.lib.images import find_images
    from stages.lib.serve import Model

    root = tiny_project(run_features=False)
    shutil.rmtree(root / "data/raw")  # download's output: a flat folder and its labels CSV
    folder = root / "data/raw/flat"
    rows = [("file", "label")]
    for c, name in enumerate(NAMES):
        for i in range(8):
            write_gradient_image(folder / f"{name}_{i}.png", (200 - 60 * c, 10 * i, 20 + 60 * c))
            rows.append((f"{name}_{i}.png", name))
    with open(folder / "labels.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["index"]["labels"] = "labels.csv"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in (index, features, leaks, train, evaluate, suspects, heatmaps, export_backbone, export, latency):
        stage.main()

    classes = ["0", "1", "02", "10"]  # class ids by number, names as given
    assert json.loads((root / "data/classes.json").read_text()) == classes
    for name, columns in {"data/index.csv": ["class"], "metrics/predictions.csv": ["true", "predicted"],
                          "metrics/suspects/label_errors.csv": ["given", "true"],
                          "metrics/eval/per_class.csv": ["class"]}.items():
        with open(root / name, newline="") as stream:
            table = list(csv.DictReader(stream))
        assert table and all(row[column] in classes for row in table for column in columns), name
    assert (root / "metrics/eval/misclassified_heatmaps.png").stat().st_size > 0
    model = Model(root / "models/export")
    assert model.classes == classes
    probs, errors = model.classify(find_images([folder]))
    assert not any(errors) and {classes[p.argmax()] for p in probs} <= set(classes)
