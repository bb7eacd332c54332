"""Stage `index`: turn the unpacked folders in data/raw/ into a shuffled CSV index with a split.

Class folders are found in two layouts (split folders or not), wherever they are under data/raw/
(lib/layouts.py); or the labels come from a CSV (`index.labels`, lib/labels.py). Every image is
decoded fully and hashed (lib/images.py); unusable files, exact duplicates and label conflicts
are left out and listed in metrics/index/summary.json with their reason; the split is seeded and
stratified (lib/splits.py).
"""

from __future__ import annotations

import logging

from stages.lib.cli import UserError, run_stage
from stages.lib.cores import cpu_threads
from stages.lib.files import write_csv_atomic, write_json_atomic
from stages.lib.labels import list_labelled_images
from stages.lib.layouts import SPLITS, list_images
from stages.lib.params import load_params
from stages.lib.paths import (
    CLASSES_JSON,
    DATA_METRICS,
    DATA_SUMMARY,
    DATASET_PNG,
    INDEX_CSV,
    RAW_DIR,
    VALIDATED_JSON,
)
from stages.lib.plots import save_dataset_overview
from stages.lib.splits import (
    IMBALANCE_WARNING,
    assign_splits,
    build_index,
    data_summary,
    describe_groups,
    drop_duplicates,
    read_validated,
    skipped_summary,
    validate,
    write_validated,
)

log = logging.getLogger("index")
HEADLINE = ("images",)  # metrics/data.json, for `dvc metrics show` in 120 columns; the rest is detail (DATA_SUMMARY)


def log_warnings(index, summary: dict, skipped: list[dict]) -> None:
    """Skipped files, a line per kind of reason (the full list is in metrics/index/summary.json), and imbalance."""
    for line in skipped_summary(skipped):
        log.warning("%s", line)
    if skipped:
        log.warning("every skipped file and its reason: %s (skipped_files)", DATA_SUMMARY)
    if summary["imbalance_ratio"] > IMBALANCE_WARNING:
        sizes = index["class"].value_counts()
        log.warning("classes are imbalanced: %s has %d images, %s %d (%.1fx); accuracy hides the small classes: "
                    "look at balanced accuracy, and consider train.class_weighting", sizes.index[0], sizes.iloc[0],
                    sizes.index[-1], sizes.iloc[-1], summary["imbalance_ratio"])


def main() -> None:
    params = load_params().index
    if not RAW_DIR.is_dir():
        raise UserError(f"{RAW_DIR}: not found; run the download stage first (dvc repro)")
    if params.labels:
        layout, classes, candidates, skipped, unlisted = list_labelled_images(RAW_DIR, params)
    else:
        (layout, classes, candidates, skipped), unlisted = list_images(RAW_DIR), None
    workers = params.workers or cpu_threads()
    known = read_validated(VALIDATED_JSON, params.max_pixels)
    valid, invalid, found = validate(candidates, RAW_DIR, params.max_pixels, workers, known)
    images, duplicates = drop_duplicates(valid)
    skipped += invalid + duplicates
    empty = sorted(set(classes) - {im.class_name for im in images})
    if empty:
        raise UserError(f"class folder '{empty[0]}' has no usable images; add images or remove the folder")
    groups = describe_groups([im.path for im in images], params.group_by) if params.group_by else None
    if groups:
        log.info("index.group_by: %d of %d files in %d groups, each kept in one split", groups["grouped_files"],
                 len(images), groups["groups"])
    splits = assign_splits(images, params)
    index = build_index(images, splits, classes, params.seed)

    write_csv_atomic(INDEX_CSV, index)
    write_json_atomic(CLASSES_JSON, classes)
    # Only the files present now: the cache never outgrows the data.
    write_validated(VALIDATED_JSON, params.max_pixels, found)
    log.info("%d files validated: %d contents decoded, %d known from the last run (%s, %.1f MB)", len(candidates),
             len(set(found) - set(known)), len(set(found) & set(known)), VALIDATED_JSON,
             VALIDATED_JSON.stat().st_size / 1e6)
    summary = data_summary(index, classes, layout, skipped)
    if groups:
        summary["group_by"] = groups
    if unlisted is not None:
        summary["not_in_labels"] = unlisted  # images under data/raw/ the CSV does not list: ignored
    write_json_atomic(DATA_SUMMARY, summary)
    write_json_atomic(DATA_METRICS, {key: summary[key] for key in HEADLINE})
    save_dataset_overview(index, classes, DATASET_PNG)
    log_warnings(index, summary, skipped)
    log.info(
        "%s layout, %d classes, %d images (%s), %d skipped",
        layout, len(classes), len(index),
        ", ".join(f"{s} {summary['counts'][s]['total']}" for s in SPLITS), len(skipped),
    )


if __name__ == "__main__":
    run_stage(main)
