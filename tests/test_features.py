"""Stage `features`: the frozen backbone's outputs, computed once per image and view."""

from __future__ import annotations

import pandas as pd
import torch

from stages import features
from stages.data import RAW_DIR, eval_transform, load_image, decode_size
from stages.features import load_backbone


def test_features_hold_every_view_and_match_the_backbone(tiny_project):
    root = tiny_project(features={"views": 3})
    saved = torch.load(root / "data/features.pt", weights_only=True)
    table = pd.read_csv(root / "data/index.csv")
    train, val = saved["train"], saved["val"]
    assert train["features"].shape == ((table.split == "train").sum(), 2 + 3, 256)
    assert val["features"].shape == ((table.split == "val").sum(), 2, 256)
    assert "test" not in saved  # the test split is for the evaluate stage alone
    assert train["paths"] == table.loc[table.split == "train", "path"].tolist()
    assert train["labels"].tolist() == table.loc[table.split == "train", "label"].tolist()

    backbone, prep = load_backbone(torch.device("cpu"))
    image = load_image(root / RAW_DIR / val["paths"][0], decode_size(prep))
    plain = eval_transform(prep)(image)[None]
    with torch.inference_mode():
        expected = torch.cat([backbone(plain), backbone(plain.flip(-1))])
    torch.testing.assert_close(val["features"][0], expected, rtol=1e-4, atol=1e-5)
    # Augmented views differ from the plain one.
    assert not torch.allclose(train["features"][0, 0], train["features"][0, 2])


def test_features_are_reproducible(tiny_project):
    root = tiny_project()
    first = (root / "data/features.pt").read_bytes()
    features.main()
    assert (root / "data/features.pt").read_bytes() == first
