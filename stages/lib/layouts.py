"""Where the images are: class folders under data/raw/, in one of two layouts.

Predefined split folders (train plus val/valid/validation and/or test, one folder per class
inside each) or flat class folders, wherever the archive's top folder puts them. Litter (hidden
files, __MACOSX, Thumbs.db) is ignored; files that are not images are listed with a reason.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from stages.lib.archives import ARCHIVE_SUFFIXES
from stages.lib.cli import UserError
from stages.lib.images import is_image_name

log = logging.getLogger("index")

LITTER = {"__macosx", "thumbs.db", "desktop.ini"}
SPLIT_SYNONYMS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Candidate:
    path: str  # relative to data/raw, with forward slashes
    class_name: str
    folder_split: str | None  # the split folder it came from, None in the flat layout
    sha256: str = ""
    width: int = 0
    height: int = 0



def class_order(names) -> list[str]:
    """Class names in id order: sorted, numerically when every name is an integer (0, 1, 2, ..., 10,
    not 0, 1, 10, 2), so that a class's id is the number its images are labelled with."""
    names = set(names)
    if all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)

def is_litter(name: str) -> bool:
    return name.startswith(".") or name.lower() in LITTER


def visible_children(folder: Path) -> tuple[list[Path], list[Path]]:
    entries = sorted(p for p in folder.iterdir() if not is_litter(p.name))
    return [p for p in entries if p.is_dir()], [p for p in entries if p.is_file()]


def split_folders(folder: Path) -> dict[str, Path]:
    """The predefined split folders directly under `folder`, by canonical split name."""
    found: dict[str, Path] = {}
    for sub in visible_children(folder)[0]:
        split = SPLIT_SYNONYMS.get(sub.name.lower())
        if split is None:
            continue
        if split in found:
            raise UserError(f"{folder}: both '{found[split].name}' and '{sub.name}' look like the {split} split; "
                            "keep one")
        found[split] = sub
    return found


def find_dataset_root(raw: Path) -> Path:
    """Descend through wrapper folders (the archive's top folder) to the dataset.

    A lone subfolder holding images itself is a class, not a wrapper: stop above it.
    """
    folder = raw
    while True:
        dirs, files = visible_children(folder)
        if split_folders(folder) or len(dirs) != 1 or any(map(is_image_name, files)):
            return folder
        if any(map(is_image_name, visible_children(dirs[0])[1])):
            return folder
        folder = dirs[0]


def files_under(folder: Path) -> Iterable[Path]:
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_litter(d))
        for name in sorted(files):
            if not is_litter(name):
                yield Path(current) / name


def class_folders(parent: Path) -> dict[str, Path]:
    return {d.name: d for d in visible_children(parent)[0]}


def split_sources(splits: dict[str, Path]) -> list[tuple[str, str, Path]]:
    """(split, class, folder) of predefined split folders, which must hold the same classes."""
    per_split = {split: class_folders(folder) for split, folder in splits.items()}
    reference = per_split["train"].keys()
    for split, classes in per_split.items():
        if classes.keys() != reference:
            raise UserError(
                f"{splits[split]}: class folders {sorted(classes)} differ from train's {sorted(reference)}; "
                "every split folder needs the same class folders"
            )
    return [(split, name, folder) for split, classes in per_split.items() for name, folder in classes.items()]


def no_classes_error(root: Path, raw: Path) -> UserError:
    archives = [f.relative_to(raw).as_posix() for f in visible_children(root)[1]
                if f.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if archives:
        return UserError(f"{root}: no class folders, only the archive(s) {', '.join(archives)}, nested more than one "
                         "level deep; unpack them and point data.url at the result")
    return UserError(f"{root}: no class folders found; put each class's images in a folder named after the class")


def folders_with_split_folders(root: Path, depth: int = 4) -> list[Path]:
    """Folders under `root` (not `root` itself) that hold a train folder beside val or test."""
    found, level = [], [root]
    for _ in range(depth):
        level = [d for folder in level for d in visible_children(folder)[0]]
        found += [d for d in level if "train" in split_folders(d)]
    return found


def check_unambiguous(root: Path, raw: Path) -> None:
    """Class folders that only hold folders, the same ones each: the classes could be either level."""
    classes = class_folders(root)
    inner = {name: frozenset(class_folders(folder)) for name, folder in classes.items()
             if not any(map(is_image_name, visible_children(folder)[1]))}
    names = set(inner.values())
    if len(classes) >= 2 and len(inner) == len(classes) and len(names) == 1 and len(next(iter(names))) >= 2:
        where = root.relative_to(raw).as_posix()
        raise UserError(
            f"{where}/: the folders {', '.join(sorted(classes))} each hold the folders "
            f"{', '.join(sorted(next(iter(names))))}, "
            "so the classes could be either; if the first are splits, name them train, val and test; if they are "
            "groups, name the classes' folders at the top, or list the files in a CSV (index.labels)"
        )


def find_layout(raw: Path) -> tuple[str, Path, dict[str, Path]]:
    """(layout, the folder holding the classes or split folders, the split folders)."""
    root = find_dataset_root(raw)
    splits = split_folders(root)
    if not splits:
        deeper = folders_with_split_folders(root)
        if len(deeper) > 1:
            raise UserError(f"{root}: split folders in several places: "
                            f"{', '.join(d.relative_to(raw).as_posix() + '/' for d in deeper)}; "
                            "point data.url at one of them, or remove the others")
        if deeper:
            log.info("found the split folders in %s/", deeper[0].relative_to(raw).as_posix())
            root, splits = deeper[0], split_folders(deeper[0])
        else:
            check_unambiguous(root, raw)
    if splits and "train" not in splits:
        raise UserError(
            f"{root}: found split folders {sorted(p.name for p in splits.values())} but no train folder; add one, "
            "or put the class folders side by side with no split folders (they are then split by index.split_ratios)"
        )
    if set(splits) == {"train"}:
        # Only a train folder: its classes are the dataset, split like flat class folders.
        log.info("found %s/ with classes %s but no val or test folder: val and test are carved from it by "
                 "index.split_ratios", splits["train"].relative_to(raw).as_posix(),
                 ", ".join(sorted(class_folders(splits["train"]))))
        return "train-only", splits["train"], {}
    return ("predefined" if splits else "flat"), root, splits


def list_images(raw: Path) -> tuple[str, list[str], list[Candidate], list[dict]]:
    """The layout, the sorted class names, every candidate image and the files passed over."""
    layout, root, splits = find_layout(raw)
    relative = lambda p: p.relative_to(raw).as_posix()  # noqa: E731
    skipped: list[dict] = []
    if splits:
        sources = split_sources(splits)
    else:
        sources = [(None, name, folder) for name, folder in class_folders(root).items()]
        skipped += [{"path": relative(f), "reason": "not inside a class folder"} for f in visible_children(root)[1]]
    if not sources:
        raise no_classes_error(root, raw)
    images = []
    for split, class_name, folder in sources:
        for f in files_under(folder):
            if is_image_name(f):
                images.append(Candidate(relative(f), class_name, split))
            else:
                skipped.append({"path": relative(f), "reason": f"unsupported file type '{f.suffix}'"})
    classes = class_order(name for _, name, _ in sources)
    if len(classes) < 2:
        raise UserError(f"{root}: only one class folder ('{classes[0]}'); a classifier needs at least two")
    return layout, classes, sorted(images, key=lambda im: im.path), skipped
