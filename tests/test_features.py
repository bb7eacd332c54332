"""Stage `features`: the frozen backbone's outputs, computed once per image and view."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from stages import features
from stages.lib.backbones import load_pretrained_backbone
from stages.lib.data import decode_size, eval_transform
from stages.lib.files import file_sha256, read_tensors
from stages.lib.images import load_image
from stages.lib.paths import PRETRAINED, RAW_DIR


def load_split(root, split):
    tensors, meta = read_tensors(root / f"data/features/{split}.safetensors")
    return {**meta, **{name: torch.from_numpy(value) for name, value in tensors.items()}}


@pytest.mark.parametrize("tta, held_out_views", [("hflip", ["plain", "hflip"]), ("none", ["plain"])])
def test_features_hold_every_view_and_match_the_backbone(tiny_project, tta, held_out_views):
    root = tiny_project(features={"views": 3}, model={"tta": tta})
    table = pd.read_csv(root / "data/index.csv")
    train = load_split(root, "train")
    assert train["views"] == ["plain", "hflip", "augmented_0", "augmented_1", "augmented_2"]
    assert train["features"].shape == ((table.split == "train").sum(), 5, 256)
    assert train["paths"] == table.loc[table.split == "train", "path"].tolist()
    assert train["labels"].tolist() == table.loc[table.split == "train", "label"].tolist()
    assert train["pretrained_sha256"] == file_sha256(root / PRETRAINED)
    for split in ("val", "test"):
        held_out = load_split(root, split)
        assert held_out["views"] == held_out_views
        assert held_out["features"].shape == ((table.split == split).sum(), len(held_out_views), 256)
        assert held_out["paths"] == table.loc[table.split == split, "path"].tolist()

    backbone, prep = load_pretrained_backbone(PRETRAINED, torch.device("cpu"))
    test = load_split(root, "test")
    image = load_image(root / RAW_DIR / test["paths"][0], decode_size(prep))
    plain = eval_transform(prep)(image)[None]
    with torch.inference_mode():
        expected = torch.cat([backbone(plain), backbone(plain.flip(-1))])[: len(held_out_views)]
    torch.testing.assert_close(test["features"][0], expected, rtol=1e-4, atol=1e-5)
    # Augmented views differ from the plain one.
    assert not torch.allclose(train["features"][0, 0], train["features"][0, 2])
    # and a picture shows them: four training images, plain then five augmentations each.
    assert (root / "metrics/features/augmentations.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # the features stage twice, from an empty cache
@pytest.mark.parametrize("workers", [0, 2])
def test_features_are_reproducible(tiny_project, workers):
    root = tiny_project(features={"workers": workers})
    files = [f"data/features/{split}.safetensors" for split in ("train", "val", "test")]
    files.append("metrics/features/augmentations.png")
    first = {name: (root / name).read_bytes() for name in files}
    shutil.rmtree(root / "data/cache/features")  # else the run reads what the first one computed
    features.main()
    assert {name: (root / name).read_bytes() for name in files} == first


def through_backbone(caplog) -> int:
    """Images the last features run put through the backbone, from its log."""
    lines = [r.getMessage() for r in caplog.records if "images through the backbone" in r.getMessage()]
    return sum(int(line.split(") (")[1].split(" images")[0]) for line in lines[-3:])


@pytest.mark.slow  # index and features three times
def test_added_images_alone_go_through_the_backbone_and_the_outputs_equal_a_fresh_run(tiny_project, caplog):
    import logging

    from stages import index
    from tests.conftest import write_gradient_image

    caplog.set_level(logging.INFO)
    root = tiny_project(run_features=False, features={"views": 1})
    index.main()
    features.main()
    assert through_backbone(caplog) == 28
    for i in range(3):  # about 10% more images
        write_gradient_image(root / f"data/raw/red/new_{i}.png", (150 + i, 60, 20))
    write_gradient_image(root / "data/raw/blue/new_b.png", (20, 60, 150))
    index.main()
    table = pd.read_csv(root / "data/index.csv")
    features.main()
    # The new images, and any existing one the split moved into train (it now needs the mirrored
    # and augmented views): at most one per cut and added image.
    assert 4 <= through_backbone(caplog) <= 4 + 2 * 4
    files = [root / f"data/features/{split}.safetensors" for split in ("train", "val", "test")]
    incremental = [path.read_bytes() for path in files]
    cache = root / "data/cache/features"
    vectors = sorted(p.relative_to(cache) for p in cache.rglob("*.vec"))
    views = {"train": 3, "val": 1, "test": 1}
    assert len(vectors) == sum(views[split] for split in table["split"])  # nothing else is kept
    shutil.rmtree(cache)
    features.main()
    assert through_backbone(caplog) == 32
    assert [path.read_bytes() for path in files] == incremental
    assert sorted(p.relative_to(cache) for p in cache.rglob("*.vec")) == vectors


def test_damaged_cache_entries_are_named_removed_and_computed_again(tiny_project, caplog):
    """A truncated entry, one zeroed, and two swapped (each whole, but another image's): each is
    logged with its path and computed again, and the features are those of an empty cache."""
    import logging

    from stages.lib.feature_cache import cached_vectors

    caplog.set_level(logging.INFO)
    root = tiny_project(features={"views": 1})
    files = [root / f"data/features/{split}.safetensors" for split in ("train", "val", "test")]
    fresh = [path.read_bytes() for path in files]  # the fixture's run began from an empty cache
    entries = sorted((root / "data/cache/features").rglob("*.vec"))
    truncated, zeroed, swapped_a, swapped_b = entries[0], entries[3], entries[5], entries[8]
    truncated.write_bytes(truncated.read_bytes()[:10])
    zeroed.write_bytes(bytes(len(zeroed.read_bytes())))
    a, b = swapped_a.read_bytes(), swapped_b.read_bytes()
    swapped_a.write_bytes(b)
    swapped_b.write_bytes(a)
    features.main()
    damaged = [r.getMessage() for r in caplog.records if "damaged cache entry" in r.getMessage()]
    assert sorted(line.split(":")[0] for line in damaged) == sorted(
        str(p.relative_to(root)) for p in (truncated, zeroed, swapped_a, swapped_b)), damaged
    assert "(10 bytes, not a checksum and a float32 vector)" in "".join(damaged)
    assert sum("its checksum does not match its content" in line for line in damaged) == 3
    assert through_backbone(caplog) == 4
    assert [path.read_bytes() for path in files] == fresh
    assert sorted((root / "data/cache/features").rglob("*.vec")) == entries  # healed in place
    # A vector that is whole but not finite is damaged too.
    view, sha = truncated.parent.parent.name, truncated.stem
    from stages.lib.feature_cache import entry_bytes

    nan = np.full(256, np.nan, dtype=np.float32)
    truncated.write_bytes(entry_bytes(truncated, nan))
    assert cached_vectors(truncated.parents[2], [view], [sha]) == [None] and not truncated.exists()
    assert "not finite" in caplog.text
