"""The index stage's table read back (data/index.csv, data/classes.json): every stage after index
reads its split here, without the machinery that made it."""

from __future__ import annotations

import json

import pandas as pd

from stages.lib.cli import UserError
from stages.lib.files import read_csv
from stages.lib.paths import CLASSES_JSON, INDEX_CSV


def read_classes() -> list[str]:
    if not CLASSES_JSON.is_file():
        raise UserError(f"{CLASSES_JSON}: not found; run the index stage first (dvc repro)")
    return json.loads(CLASSES_JSON.read_text(encoding="utf-8"))


def read_split(split: str) -> pd.DataFrame:
    """The index rows of one split, in the index's (seeded, shuffled) order."""
    if not INDEX_CSV.is_file():
        raise UserError(f"{INDEX_CSV}: not found; run the index stage first (dvc repro)")
    table = read_csv(INDEX_CSV)
    rows = table[table["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{INDEX_CSV}: the {split} split is empty; check the index stage's output")
    return rows
