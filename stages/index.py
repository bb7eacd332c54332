"""Stage `index`: turn the unpacked folders in data/raw/ into a shuffled CSV index with a split.

Two layouts are understood, wherever the archive's top folder is: predefined split folders
(train plus val/valid/validation and/or test, one folder per class inside each) and flat class
folders. Every image is decoded fully and hashed; unusable files, exact duplicates and label
conflicts are left out and listed in metrics/data.json with their reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages.cli import UserError, run_stage
from stages.files import atomic_path, write_json_atomic
from stages.params import IndexParams, load_params
from stages.paths import CLASSES_JSON, INDEX_CSV, RAW_DIR

log = logging.getLogger("index")

DATA_METRICS = Path("metrics/data.json")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}
LITTER = {"__macosx", "thumbs.db", "desktop.ini"}
SPLIT_SYNONYMS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
SPLITS = ("train", "val", "test")
# When duplicates straddle split folders, keep the copy that is most held out, so the
# archive's evaluation images stay exactly as published.
KEEP_PRIORITY = {"test": 0, "val": 1, "train": 2, None: 3}
CSV_COLUMNS = ["path", "class", "label", "split", "sha256", "width", "height"]


@dataclass(frozen=True)
class Candidate:
    path: str  # relative to data/raw, with forward slashes
    class_name: str
    folder_split: str | None  # the split folder it came from, None in the flat layout
    sha256: str = ""
    width: int = 0
    height: int = 0


# --- finding the layout ----------------------------------------------------------------------

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
            raise UserError(f"{folder}: both '{found[split].name}' and '{sub.name}' look like the {split} split; keep one")
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


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def files_under(folder: Path) -> Iterable[Path]:
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_litter(d))
        for name in sorted(files):
            if not is_litter(name):
                yield Path(current) / name


def class_folders(parent: Path) -> dict[str, Path]:
    return {d.name: d for d in visible_children(parent)[0]}


def list_images(raw: Path) -> tuple[str, list[str], list[Candidate], list[dict]]:
    """The layout, the sorted class names, every candidate image and the files passed over."""
    root = find_dataset_root(raw)
    splits = split_folders(root)
    skipped: list[dict] = []
    relative = lambda p: p.relative_to(raw).as_posix()  # noqa: E731
    if splits:
        if "train" not in splits or not ({"val", "test"} & splits.keys()):
            raise UserError(
                f"{root}: split folders {sorted(p.name for p in splits.values())} need a train folder and a val or test folder"
            )
        layout = "predefined"
        per_split = {split: class_folders(folder) for split, folder in splits.items()}
        reference = per_split["train"].keys()
        for split, classes in per_split.items():
            if classes.keys() != reference:
                raise UserError(
                    f"{splits[split]}: class folders {sorted(classes)} differ from train's {sorted(reference)}; "
                    "every split folder needs the same class folders"
                )
        sources = [(split, name, folder) for split, classes in per_split.items() for name, folder in classes.items()]
    else:
        layout = "flat"
        sources = [(None, name, folder) for name, folder in class_folders(root).items()]
        skipped += [{"path": relative(f), "reason": "not inside a class folder"} for f in visible_children(root)[1]]
    if not sources:
        raise UserError(f"{root}: no class folders found; put each class's images in a folder named after the class")
    images = []
    for split, class_name, folder in sources:
        for f in files_under(folder):
            if is_image_name(f):
                images.append(Candidate(relative(f), class_name, split))
            else:
                skipped.append({"path": relative(f), "reason": f"unsupported file type '{f.suffix}'"})
    classes = sorted({name for _, name, _ in sources})
    if len(classes) < 2:
        raise UserError(f"{root}: only one class folder ('{classes[0]}'); a classifier needs at least two")
    return layout, classes, sorted(images, key=lambda im: im.path), skipped


# --- validating ------------------------------------------------------------------------------

def inspect_file(job: tuple[str, int]) -> tuple[str, int, int, str]:
    """(sha256, width, height, reason) for one file; reason is "" for a usable image."""
    path, max_pixels = job
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return "", 0, 0, f"unreadable ({err.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return digest, 0, 0, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return digest, width, height, (
                    f"decompression bomb: {width}x{height} pixels is over index.max_pixels ({max_pixels})"
                )
            image.load()  # decode every byte: a truncated or corrupt file fails here, not in training
    except Image.UnidentifiedImageError:
        return digest, 0, 0, "not an image"
    except Exception as err:  # PIL raises many types for corrupt data; all mean the same here
        return digest, 0, 0, f"corrupt or truncated image ({str(err) or type(err).__name__})"
    return digest, width, height, ""


def disable_pil_pixel_limit() -> None:
    # index.max_pixels is the limit; PIL's own would raise before we can report it.
    Image.MAX_IMAGE_PIXELS = None


def inspect_all(images: list[Candidate], raw: Path, max_pixels: int, workers: int) -> Iterable[tuple[str, int, int, str]]:
    jobs = [(str(raw / image.path), max_pixels) for image in images]
    progress = dict(total=len(jobs), desc="validating images", unit="img", disable=None)
    if workers == 1:
        disable_pil_pixel_limit()
        yield from tqdm(map(inspect_file, jobs), **progress)
        return
    # spawn, not fork: forking a process that already runs threads (torch's, in the tests or a
    # notebook) can deadlock the children on a lock held at fork time.
    with get_context("spawn").Pool(workers, initializer=disable_pil_pixel_limit) as pool:
        yield from tqdm(pool.imap(inspect_file, jobs, chunksize=8), **progress)


def validate(images: list[Candidate], raw: Path, max_pixels: int, workers: int) -> tuple[list[Candidate], list[dict]]:
    usable, skipped = [], []
    for image, (digest, width, height, reason) in zip(images, inspect_all(images, raw, max_pixels, workers)):
        if reason:
            skipped.append({"path": image.path, "reason": reason})
        else:
            usable.append(replace(image, sha256=digest, width=width, height=height))
    return usable, skipped


def drop_duplicates(images: list[Candidate]) -> tuple[list[Candidate], list[dict]]:
    """Keep one copy of each content; leave out every copy of content filed under two classes."""
    by_hash: dict[str, list[Candidate]] = defaultdict(list)
    for image in images:
        by_hash[image.sha256].append(image)
    kept, skipped = [], []
    for copies in by_hash.values():
        classes = sorted({c.class_name for c in copies})
        if len(classes) > 1:
            where = ", ".join(f"{c.path} ({c.class_name})" for c in copies)
            skipped += [{"path": c.path, "reason": f"label conflict: identical files under classes {classes}: {where}"} for c in copies]
            continue
        copies = sorted(copies, key=lambda c: (KEEP_PRIORITY[c.folder_split], c.path))
        kept.append(copies[0])
        skipped += [{"path": c.path, "reason": f"duplicate of {copies[0].path}"} for c in copies[1:]]
    return sorted(kept, key=lambda im: im.path), skipped


# --- splitting -------------------------------------------------------------------------------

def stratified_split(
    class_names: Sequence[str], ratios: Sequence[float], split_names: Sequence[str], seed: int
) -> list[str]:
    """A split name per item: each class is shuffled and cut by `ratios`, within one image of exact.

    The first split takes what is left after rounding the others, so no image is lost.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(class_names):
        by_class[name].append(i)
    assigned = [""] * len(class_names)
    for name in sorted(by_class):
        members = rng.permutation(by_class[name])
        counts = [math.floor(len(members) * r + 0.5) for r in ratios[1:]]
        counts.insert(0, len(members) - sum(counts))
        if min(counts) < 1:
            need = math.ceil(1 / min(ratios))
            raise UserError(
                f"class '{name}' has {len(members)} usable images, too few to split into "
                f"{'/'.join(split_names)} with ratios {list(ratios)}; it needs about {need}: add images or drop the class"
            )
        start = 0
        for split, count in zip(split_names, counts):
            for i in members[start:start + count]:
                assigned[i] = split
            start += count
    return assigned


def assign_splits(images: list[Candidate], layout: str, params: IndexParams) -> list[str]:
    names = [im.class_name for im in images]
    if layout == "flat":
        return stratified_split(names, params.split_ratios, SPLITS, params.seed)
    folder_splits = {im.folder_split for im in images}
    if "val" in folder_splits and "test" in folder_splits:
        return [im.folder_split for im in images]
    # One held-out folder: it becomes the test split (never used to pick a model), and val is
    # carved out of train.
    splits = ["test" if im.folder_split != "train" else "" for im in images]
    train_rows = [i for i, s in enumerate(splits) if not s]
    carved = stratified_split(
        [names[i] for i in train_rows], (1 - params.val_fraction, params.val_fraction), ("train", "val"), params.seed
    )
    for i, split in zip(train_rows, carved):
        splits[i] = split
    return splits


# --- writing ---------------------------------------------------------------------------------

def build_index(images: list[Candidate], splits: list[str], classes: list[str], seed: int) -> pd.DataFrame:
    label = {name: i for i, name in enumerate(classes)}
    table = pd.DataFrame(
        {
            "path": [im.path for im in images],
            "class": [im.class_name for im in images],
            "label": [label[im.class_name] for im in images],
            "split": splits,
            "sha256": [im.sha256 for im in images],
            "width": [im.width for im in images],
            "height": [im.height for im in images],
        },
        columns=CSV_COLUMNS,
    )
    order = np.random.default_rng(seed).permutation(len(table))
    return table.iloc[order].reset_index(drop=True)


def data_summary(index: pd.DataFrame, classes: list[str], layout: str, skipped: list[dict]) -> dict:
    counts = {}
    for split in SPLITS:
        per_class = Counter(index.loc[index["split"] == split, "class"])
        counts[split] = {name: per_class.get(name, 0) for name in classes} | {"total": sum(per_class.values())}
    return {
        "layout": layout,
        "classes": len(classes),
        "images": len(index),
        "counts": counts,
        "skipped": len(skipped),
        "skipped_files": sorted(skipped, key=lambda s: s["path"]),
    }


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
