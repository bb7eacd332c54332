"""Where each stage reads and writes, relative to the project root; dvc.yaml declares the same paths."""

from pathlib import Path

RAW_DIR = Path("data/raw")
INDEX_CSV = Path("data/index.csv")
CLASSES_JSON = Path("data/classes.json")
PRETRAINED = Path("models/pretrained.pt")
FEATURES_DIR = Path("data/features")
MODEL = Path("models/model.pt")
TRAIN_STATE = Path("models/train_state.pt")  # to resume an interrupted train stage from
EXPORT_DIR = Path("models/export")
BACKBONE_EXPORT_DIR = Path("models/backbone_export")  # the pretrained backbone alone, for export to reuse


def features_file(split: str) -> Path:
    """One file per split, so that dvc.yaml can show the train stage never reads the test split."""
    return FEATURES_DIR / f"{split}.pt"
