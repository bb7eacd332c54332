"""Where each stage reads and writes, relative to the project root; dvc.yaml declares the same paths."""

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
PARAMS_OK = Path("data/params.ok")  # check: written only when params.yaml is valid; every stage depends on it
SOURCE_JSON = Path("data/source.json")  # check: a fingerprint of what data.url names, for DVC to watch
SHELF_DIR = Path("data/archives")  # archives the project ships, found before the network
RAW_DIR = Path("data/raw")
INDEX_CSV = Path("data/index.csv")
CLASSES_JSON = Path("data/classes.json")
# What the index stage found per image content, so an unchanged image is not decoded again (persist: true)
VALIDATED_JSON = Path("data/cache/images.json")
FEATURE_CACHE = Path("data/cache/features")  # each image's feature vectors, kept between runs (persist: true)
DATA_METRICS = Path("metrics/data.json")  # the headline numbers: what `dvc metrics show` prints
DATA_SUMMARY = Path("metrics/index/summary.json")  # all of them: counts per split and class, skipped files
DATASET_PNG = Path("metrics/index/dataset.png")  # images per class and split, image sizes

PRETRAINED = Path("models/pretrained.pt")
FEATURES_DIR = Path("data/features")
AUGMENTATIONS_PNG = Path("metrics/features/augmentations.png")  # what the network sees in training

MODEL = Path("models/model.safetensors")  # lib/checkpoint.py
TRAIN_STATE = Path("models/train_state.pt")  # to resume an interrupted train stage from
TRAIN_LOCK = Path("models/.train.lock")  # held by the one train process writing models/ and metrics/train
TRAIN_METRICS = Path("metrics/train.json")  # the best epoch's val accuracy
LIVE_DIR = Path("metrics/train")  # DVCLive: the best epoch's val scores (metrics.json) and per-epoch plots
CURVES_PNG = LIVE_DIR / "learning_curves.png"
HEAD_SEARCH_CSV = LIVE_DIR / "head_search.csv"  # the head settings tried (lib/head_search.py)
TIME_JSON = LIVE_DIR / "time.json"  # seconds per kind of work, threads; not in metrics.json, which is reproducible

LEAKS_JSON = Path("metrics/leaks.json")  # near-duplicate pairs across splits: their count (leaks)
LEAKS_SUMMARY = Path("metrics/leaks/summary.json")  # and the threshold, the images of each split in a pair
LEAK_PAIRS_CSV = Path("metrics/leaks.csv")
LEAK_PAIRS_PNG = Path("metrics/leaks/pairs.png")

EVAL_JSON = Path("metrics/eval.json")  # test accuracy, macro-F1, calibration error
PREDICTIONS_CSV = Path("metrics/predictions.csv")
EVAL_DIR = Path("metrics/eval")
EVAL_SUMMARY = EVAL_DIR / "summary.json"  # with 95% intervals, balanced accuracy, loss, Brier score, ...
CONFUSION_CSV = EVAL_DIR / "confusion.csv"
GRID_PNG = EVAL_DIR / "predictions.png"
MISCLASSIFIED_PNG = EVAL_DIR / "misclassified.png"
CONFUSION_PNG = EVAL_DIR / "confusion.png"
PER_CLASS_CSV = EVAL_DIR / "per_class.csv"  # precision, recall, F1, support, ROC AUC, AP per class
CONFUSED_PAIRS_CSV = EVAL_DIR / "confused_pairs.csv"
PREDICTIONS_HEATMAPS_PNG = EVAL_DIR / "predictions_heatmaps.png"  # where the model looks, in GRID_PNG's images
MISCLASSIFIED_HEATMAPS_PNG = EVAL_DIR / "misclassified_heatmaps.png"
SUSPECTS_METRICS = Path("metrics/suspects.json")  # how many labels are estimated wrong, and the index's md5
SUSPECTS_DIR = Path("metrics/suspects")
SUSPECTS_CSV = SUSPECTS_DIR / "suspects.csv"  # the images whose label is probably wrong, most suspect first
SUSPECTS_PAIRS_CSV = SUSPECTS_DIR / "label_errors.csv"  # estimated wrong labels per (given, true) class pair
SUSPECTS_PNG = SUSPECTS_DIR / "suspects.png"
SUSPECTS_SUMMARY = SUSPECTS_DIR / "summary.json"  # the estimate's detail, and the index it audited
RELIABILITY_CSV = EVAL_DIR / "reliability.csv"
RELIABILITY_PNG = EVAL_DIR / "reliability.png"
CLASS_CURVES_PNG = EVAL_DIR / "curves.png"  # one-vs-rest ROC and precision-recall

EXPORT_DIR = Path("models/export")
EXPORT_METRICS = Path("metrics/export.json")  # whether INT8 shipped, and the exported model's md5
EXPORT_SUMMARY = Path("metrics/export/summary.json")  # fp32 and INT8 test scores, their agreement, the model's md5
LATENCY_JSON = Path("metrics/latency.json")  # each engine's speed on the machine that ran the stage: not a metric
LATENCY_CSV = Path("metrics/latency/engines.csv")  # the same, a row per engine: a DVC plot
# The exported backbones' outputs on each test image, kept between runs (persist: true)
EXPORT_CACHE = Path("data/cache/export")
BACKBONE_EXPORT_DIR = Path("models/backbone_export")  # the pretrained backbone alone, for export to reuse


def features_file(split: str) -> Path:
    """One file per split, so that dvc.yaml can show the train stage never reads the test split."""
    return FEATURES_DIR / f"{split}.safetensors"

