"""Stage `index`: turn the unpacked folders in data/raw/ into a shuffled CSV index with a split.

Two layouts are understood, wherever the archive's top folder is (lib/layouts.py). Every image is
decoded fully and hashed (lib/images.py); unusable files, exact duplicates and label conflicts
are left out and listed in metrics/data.json with their reason; the split is seeded and
stratified (lib/splits.py).
"""

from __future__ import annotations

import logging
import os

from stages.lib.cli import UserError, run_stage
from stages.lib.files import atomic_path, write_json_atomic
from stages.lib.layouts import SPLITS, list_images
from stages.lib.params import load_params
from stages.lib.paths import CLASSES_JSON, DATA_METRICS, INDEX_CSV, RAW_DIR
from stages.lib.splits import assign_splits, build_index, data_summary, drop_duplicates, validate

log = logging.getLogger("index")


def main() -> None:
    params = load_params().index
    if not RAW_DIR.is_dir():
        raise UserError(f"{RAW_DIR}: not found; run the download stage first (dvc repro)")
    layout, classes, candidates, skipped = list_images(RAW_DIR)
    workers = params.workers or os.cpu_count() or 1
    valid, invalid = validate(candidates, RAW_DIR, params.max_pixels, workers)
    images, duplicates = drop_duplicates(valid)
    skipped += invalid + duplicates
    empty = sorted(set(classes) - {im.class_name for im in images})
    if empty:
        raise UserError(f"class folder '{empty[0]}' has no usable images; add images or remove the folder")
    splits = assign_splits(images, layout, params)
    index = build_index(images, splits, classes, params.seed)

    with atomic_path(INDEX_CSV) as tmp:
        index.to_csv(tmp, index=False, lineterminator="\n")
    write_json_atomic(CLASSES_JSON, classes)
    summary = data_summary(index, classes, layout, skipped)
    write_json_atomic(DATA_METRICS, summary)
    for entry in summary["skipped_files"]:
        log.warning("skipped %s: %s", entry["path"], entry["reason"])
    log.info(
        "%s layout, %d classes, %d images (%s), %d skipped",
        layout, len(classes), len(index),
        ", ".join(f"{s} {summary['counts'][s]['total']}" for s in SPLITS), len(skipped),
    )


if __name__ == "__main__":
    run_stage(main)
