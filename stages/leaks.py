"""Stage `leaks`: near-duplicate images across the train, val and test splits.

Reads the cached features (no backbone runs here), writes every pair above `leaks.threshold` to
metrics/leaks.csv (both paths and the similarity), their count to metrics/leaks.json (with the
images of each split in a pair: metrics/leaks/summary.json), and the most similar pairs side by
side to metrics/leaks/pairs.png (lib/leaks.py says how they are found). It
reports and changes nothing: a user who finds real copies removes them from the data or puts
both in the same split.
"""

from __future__ import annotations

import logging

from stages.lib.cli import run_stage
from stages.lib.features import read_features
from stages.lib.files import write_csv_atomic, write_json_atomic
from stages.lib.images import load_image
from stages.lib.leaks import cross_split_pairs, leak_summary
from stages.lib.params import load_params
from stages.lib.paths import LEAK_PAIRS_CSV, LEAK_PAIRS_PNG, LEAKS_JSON, LEAKS_SUMMARY, RAW_DIR
from stages.lib.plots import save_titled_arrays

log = logging.getLogger("leaks")


def side_by_side(path_a: str, path_b: str, size: int = 256):
    """The two images of a pair as one array (HxWx3, 0..1), a white gap between them."""
    import numpy as np

    halves = [np.asarray(load_image(RAW_DIR / path, size).resize((size, size))) / 255 for path in (path_a, path_b)]
    return np.concatenate([halves[0], np.ones((size, size // 16, 3)), halves[1]], axis=1)


def draw_pairs(pairs, count: int) -> None:
    shown = pairs.head(count)
    images = [side_by_side(row.path_a, row.path_b) for row in shown.itertuples()]
    titles = [f"{row.similarity:.3f}   {row.split_a}: {row.path_a}\n{row.split_b}: {row.path_b}"
              for row in shown.itertuples()]
    save_titled_arrays(images, titles, LEAK_PAIRS_PNG,
                       f"the {len(shown)} most similar of {len(pairs)} cross-split pairs (leaks.threshold)")


def main() -> None:
    params = load_params().leaks
    splits = {name: read_features(name, in_memory=True) for name in ("train", "val", "test")}
    pairs = cross_split_pairs(splits, params.threshold)
    write_csv_atomic(LEAK_PAIRS_CSV, pairs)
    summary = leak_summary(pairs, params.threshold)
    write_json_atomic(LEAKS_SUMMARY, summary)
    write_json_atomic(LEAKS_JSON, {"leaks": summary["near_duplicates"]})  # pairs; a short name: `dvc metrics show`
    draw_pairs(pairs, params.pictures)
    if len(pairs):
        log.warning("%d image pairs across splits look like near-duplicates (similarity >= %g), %d test images among "
                    "them: the test score may be inflated; see %s and %s", len(pairs), params.threshold,
                    summary["images_in_pairs"]["test"], LEAK_PAIRS_CSV, LEAK_PAIRS_PNG)
    else:
        log.info("no near-duplicates across splits (similarity >= %g)", params.threshold)


if __name__ == "__main__":
    run_stage(main)
