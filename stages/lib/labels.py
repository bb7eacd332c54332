"""Labels from a CSV (`index.labels`): a path column, a label column and optionally a split column,
as many public datasets ship them, and as the recipe's own CSV index is.

The CSV is found by its name anywhere under data/raw/ (or by its path there). Each row's file is
looked for relative to the CSV's folder, then to data/raw/, then (for a bare name or an id without
extension) by that name alone among the images under the CSV's folder when exactly one matches.
Column names are params; left null, each is detected from its name when exactly one column has a
usual name for it.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path, PurePosixPath

import pandas as pd

from stages.lib.cli import UserError
from stages.lib.images import is_image_name
from stages.lib.layouts import SPLIT_SYNONYMS, Candidate, class_order, files_under
from stages.lib.params import IndexParams

log = logging.getLogger("index")

PATH_NAMES = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path",
              "image_name", "image_id", "img", "id")
LABEL_NAMES = ("label", "labels", "class", "class_name", "category", "target", "y")
SPLIT_NAMES = ("split", "subset", "set", "partition")


def find_labels_csv(raw: Path, name: str, files: list[Path]) -> Path:
    """The CSV `index.labels` names: its path under `raw`, or the one file of that name in `files`."""
    if "/" in name or "\\" in name:
        path = raw / name.replace("\\", "/")
        if not path.is_file():
            raise UserError(f"index.labels: {path} not found; give the CSV's path under {raw}/ or just its name")
        return path
    found = [p for p in files if p.name == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"index.labels: {len(found)} files named {name} under {raw}/ "
                        f"({', '.join(p.relative_to(raw).as_posix() for p in found[:4])}); give the one's path")
    others = [p.relative_to(raw).as_posix() for p in files if p.suffix.lower() in (".csv", ".tsv", ".txt")]
    hint = f"CSV files there: {', '.join(others[:5])}" if others else "there is no CSV file there"
    raise UserError(f"index.labels: no file named {name} under {raw}/ ({hint}); fix index.labels")


def read_table(path: Path) -> pd.DataFrame:
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            sample = stream.read(65536)
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        read = dict(sep=dialect.delimiter, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        table = pd.read_csv(path, **read)
        if any(is_image_name(PurePosixPath(str(name))) for name in table.columns):
            # The first line names an image, not a column: there is no header row, and that line is data.
            log.info("%s has no header row: its first line is read as data", path.name)
            table = pd.read_csv(path, header=None, **read)
            table.columns = [f"column{i + 1}" for i in range(len(table.columns))]
        return table
    except (csv.Error, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{path}: not a readable CSV ({reason}); fix the file or index.labels") from None


def pick_column(table: pd.DataFrame, given: str | None, names: tuple[str, ...], role: str, param: str,
                source: Path) -> str | None:
    """The column for `role`: the one given, else the one with a usual name, else None."""
    columns = list(table.columns)
    if given is not None:
        if given not in columns:
            raise UserError(f"index.{param}: {source.name} has no column '{given}' "
                            f"(its columns: {', '.join(columns)}); "
                            f"fix index.{param}")
        return given
    matches = [c for c in columns if c.strip().lower() in names]
    if len(matches) > 1:
        raise UserError(f"{source}: columns {', '.join(matches)} could each be the {role}; "
                        f"set index.{param} to the right one")
    return matches[0] if matches else None


def detect_columns(table: pd.DataFrame, params: IndexParams, source: Path) -> tuple[str, str, str | None]:
    path = pick_column(table, params.path_column, PATH_NAMES, "file path", "path_column", source)
    if path is None:
        # The column whose values are image file names.
        looks = [c for c in table.columns
                 if len(table) and table[c].map(lambda v: is_image_name(PurePosixPath(v))).mean() > 0.9]
        if len(looks) != 1:
            raise UserError(f"{source}: cannot tell which column holds the file paths (columns: "
                            f"{', '.join(table.columns)}); set index.path_column")
        path = looks[0]
    split = pick_column(table, params.split_column, SPLIT_NAMES, "split", "split_column", source)
    label = pick_column(table, params.label_column, LABEL_NAMES, "label", "label_column", source)
    if label is None:
        rest = [c for c in table.columns if c not in (path, split)]
        if len(rest) != 1:
            raise UserError(f"{source}: cannot tell which column holds the labels (columns: "
                            f"{', '.join(table.columns)}); set index.label_column")
        label = rest[0]
    return path, label, split


def canonical_split(value: str, row: int, source: Path) -> str:
    split = SPLIT_SYNONYMS.get(value.strip().lower())
    if split is None:
        raise UserError(f"{source}: row {row}: split '{value}' is not train, val or test (or a synonym: "
                        "training, valid, validation, dev, testing); fix the value")
    return split


class FileFinder:
    """A row's file: relative to the CSV's folder, to data/raw/, or by its name alone when unique."""

    def __init__(self, raw: Path, folder: Path, files: list[Path]):
        self.raw, self.folder = raw, folder
        self.by_name: dict[str, list[Path]] = defaultdict(list)
        for f in files:
            if f.is_relative_to(folder) and is_image_name(f):
                self.by_name[f.name].append(f)
                self.by_name[f.stem].append(f)

    def find(self, name: str) -> tuple[Path | None, str]:
        relative = PurePosixPath(name.strip().replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            return None, "not a path inside the data"
        for base in (self.folder, self.raw):
            candidate = base.joinpath(*relative.parts)
            if candidate.is_file():
                return candidate, ""
        matches = self.by_name.get(relative.name, [])
        if len(matches) == 1:
            return matches[0], ""
        return None, "not found" if not matches else f"{len(matches)} files are named {relative.name}"


def list_labelled_images(raw: Path, params: IndexParams) -> tuple[str, list[str], list[Candidate], list[dict], int]:
    """(layout, classes, candidates, skipped, images under data/raw/ the CSV does not list)."""
    files = list(files_under(raw))  # one walk of the data serves every lookup below
    source = find_labels_csv(raw, params.labels, files)
    table = read_table(source)
    path_column, label_column, split_column = detect_columns(table, params, source)
    log.info("labels from %s: paths in '%s', labels in '%s'%s", source.relative_to(raw).as_posix(), path_column,
             label_column, f", splits in '{split_column}'" if split_column else "")
    finder = FileFinder(raw, source.parent, files)
    relative = lambda p: p.relative_to(raw).as_posix()  # noqa: E731
    rows: dict[str, list[tuple[int, str, str | None]]] = defaultdict(list)
    skipped = []
    for number, row in enumerate(table.itertuples(index=False), start=2):  # row 1 is the header
        values = dict(zip(table.columns, row))
        name, label = values[path_column].strip(), values[label_column].strip()
        split = canonical_split(values[split_column], number, source) if split_column else None
        found, reason = finder.find(name)
        if found is None:
            skipped.append({"path": name, "reason": f"listed in {source.name} (row {number}) but {reason}"})
        elif not label:
            skipped.append({"path": relative(found), "reason": f"no label in {source.name} (row {number})"})
        else:
            rows[relative(found)].append((number, label, split))
    images = []
    for path, entries in rows.items():
        labels = sorted({label for _, label, _ in entries})
        if len(labels) > 1:
            skipped.append({"path": path, "reason": f"label conflict: {source.name} gives it the labels {labels}"})
            continue
        number, label, split = entries[0]
        images.append(Candidate(path, label, split))
        skipped += [{"path": path, "reason": f"listed again in {source.name} (row {n})"} for n, _, _ in entries[1:]]
    listed = {im.path for im in images} | {s["path"] for s in skipped}
    unlisted = [f for f in files if is_image_name(f) and relative(f) not in listed]
    if unlisted:
        log.info("%d images under %s/ are not in %s and were left out (the first: %s)", len(unlisted), raw,
                 source.name, relative(unlisted[0]))
    classes = class_order(im.class_name for im in images)
    if len(classes) < 2:
        raise UserError(f"{source}: {len(classes)} label(s) with usable images ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least two")
    layout = "csv with splits" if split_column else "csv"
    return layout, classes, sorted(images, key=lambda im: im.path), skipped, len(unlisted)
