"""Stage `leaks`: near-duplicate images across splits, found on the cached features."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.lib import leaks as leaks_lib
from tests.conftest import PROJECT_ROOT, deep_merge

FIXTURES = Path(__file__).parent / "fixtures"


def split(vectors: list[list[float]], prefix: str) -> dict:
    return {"views": ["plain"], "features": np.array(vectors, dtype=np.float32)[:, None, :],
            "paths": [f"{prefix}_{i}.jpg" for i in range(len(vectors))]}


def test_pairs_across_splits_above_the_threshold_whatever_the_block_size(monkeypatch):
    splits = {"train": split([[1, 0, 0], [0, 1, 0], [0, 0, 1]], "train"),
              "val": split([[0.98, 0.05, 0], [0, 0, 1]], "val"),  # a copy of train_0, the same as train_2
              "test": split([[0, 0.99, 0.05], [1, 1, 0]], "test")}  # a copy of train_1, and a blend
    full = leaks_lib.cross_split_pairs(splits, threshold=0.9)
    assert list(full.columns) == ["similarity", "split_a", "path_a", "split_b", "path_b"]
    assert full.similarity.is_monotonic_decreasing and (full.similarity >= 0.9).all()
    found = {(r.path_a, r.path_b) for r in full.itertuples()}
    assert {("train_0.jpg", "val_0.jpg"), ("train_2.jpg", "val_1.jpg"), ("train_1.jpg", "test_0.jpg")} <= found
    assert not any("test_1.jpg" in pair for pair in found)
    monkeypatch.setattr(leaks_lib, "BLOCK", 1)
    pd.testing.assert_frame_equal(leaks_lib.cross_split_pairs(splits, threshold=0.9), full)
    summary = leaks_lib.leak_summary(full, 0.9)
    assert summary["near_duplicates"] == len(full) and summary["images_in_pairs"]["test"] == 1


def copies(path: Path) -> dict[str, Image.Image]:
    original = Image.open(path).convert("RGB")
    buffer = io.BytesIO()
    original.save(buffer, "JPEG", quality=40)
    w, h = original.size
    return {"recoded": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
            # The fixtures are 288 px: 80% keeps about the network's 224 px input. A copy far below the
            # input size loses what the backbone sees (half size: 0.66 here; README, Leaks).
            "resized": original.resize((w * 4 // 5, h * 4 // 5)),
            "cropped": original.crop((int(w * 0.06), int(h * 0.06), int(w * 0.94), int(h * 0.94)))}


@pytest.mark.slow  # builds the real pretrained EfficientNet-Lite0
def test_reencoded_resized_and_cropped_copies_are_found_distinct_photos_are_not(project, caplog):
    import yaml

    from stages import features, index, leaks, weights

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    root = project(**deep_merge(params, {"model": {"backbone": "efficientnet_lite0"},
                                         "features": {"views": 0, "workers": 0}, "index": {"workers": 1}}))
    raw = root / "data/raw"
    layout = {"train": ["ant_0", "ant_1", "bee_0", "bee_1"], "val": ["ant_2", "bee_2"], "test": ["ant_3", "bee_3"]}
    for name, files in layout.items():
        for stem in files:
            target = raw / name / ("ants" if stem.startswith("ant") else "bees") / f"{stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((FIXTURES / f"{stem}.jpg").read_bytes())
    planted = {("ant_0", "recoded", "val"), ("bee_1", "resized", "test"), ("ant_1", "cropped", "test")}
    for stem, kind, name in planted:
        folder = raw / name / ("ants" if stem.startswith("ant") else "bees")
        copies(FIXTURES / f"{stem}.jpg")[kind].save(folder / f"{stem}_{kind}.jpg", quality=90)
    index.main()
    weights.main()
    features.main()
    caplog.set_level("INFO")
    leaks.main()
    pairs = pd.read_csv(root / "metrics/leaks.csv")
    found = {(Path(r.path_a).stem, Path(r.path_b).stem) for r in pairs.itertuples()}
    assert found == {(stem, f"{stem}_{kind}") for stem, kind, _ in planted}, pairs
    summary = json.loads((root / "metrics/leaks/summary.json").read_text())
    assert summary["near_duplicates"] == 3 and summary["images_in_pairs"] == {"train": 3, "val": 1, "test": 2}
    assert json.loads((root / "metrics/leaks.json").read_text()) == {"leaks": 3}
    assert "3 image pairs across splits look like near-duplicates" in caplog.text
    assert (root / "metrics/leaks/pairs.png").read_bytes().startswith(b"\x89PNG")
