"""From the usable images to the index: duplicates left out, a seeded stratified split, the
shuffled table written to data/index.csv, and the summary in metrics/index/summary.json."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import PIL

from stages.lib.cli import UserError
from stages.lib.files import write_json_atomic
from stages.lib.images import inspect_files
from stages.lib.layouts import SPLITS, Candidate
from stages.lib.params import IndexParams

log = logging.getLogger("index")

# When duplicates straddle split folders, keep the copy that is most held out, so the
# archive's evaluation images stay exactly as published.
KEEP_PRIORITY = {"test": 0, "val": 1, "train": 2, None: 3}
CSV_COLUMNS = ["path", "class", "label", "split", "sha256", "width", "height"]


VALIDATED_VERSION = 2  # of data/cache/images.json's entries


def entries_checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def read_validated(path: Path, max_pixels: int) -> dict:
    """sha256 -> [width, height, reason] of the files an earlier run validated, if it ran with the
    same index.max_pixels and Pillow (which decides what decodes); else nothing. A file that is
    unreadable, or whose entries do not match their checksum (edited by hand), is logged and
    rebuilt: every file is decoded again, as on a first run."""
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        entries = cache["images"]
        if cache["version"] != VALIDATED_VERSION:
            return {}
        if cache["checksum"] != entries_checksum(entries):
            raise ValueError("its entries do not match their checksum")
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
        log.warning("%s: damaged (%s): rebuilt, every image decoded again", path, reason.splitlines()[0])
        return {}
    if cache.get("pillow") != PIL.__version__ or cache.get("max_pixels") != max_pixels:
        return {}
    return entries


def write_validated(path: Path, max_pixels: int, entries: dict) -> None:
    entries = dict(sorted(entries.items()))
    write_json_atomic(path, {"version": VALIDATED_VERSION, "pillow": PIL.__version__, "max_pixels": max_pixels,
                             "checksum": entries_checksum(entries), "images": entries})


def validate(images: list[Candidate], raw: Path, max_pixels: int, workers: int,
             known: dict | None = None) -> tuple[list[Candidate], list[dict], dict]:
    """The usable images (with content hash and size), the skipped ones with their reason, and
    what was found per content hash (for `known` next time: a file whose content is in `known` is
    not decoded again)."""
    usable, skipped, found = [], [], {}
    inspected = inspect_files([raw / image.path for image in images], max_pixels, workers, known)
    for image, (digest, width, height, reason) in zip(images, inspected):
        if digest:
            found[digest] = [width, height, reason]
        if reason:
            skipped.append({"path": image.path, "reason": reason})
        else:
            usable.append(replace(image, sha256=digest, width=width, height=height))
    return usable, skipped, found


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
            reason = f"label conflict: identical files under classes {classes}: {where}"
            skipped += [{"path": c.path, "reason": reason} for c in copies]
            continue
        copies = sorted(copies, key=lambda c: (KEEP_PRIORITY[c.folder_split], c.path))
        kept.append(copies[0])
        skipped += [{"path": c.path, "reason": f"duplicate of {copies[0].path}"} for c in copies[1:]]
    return sorted(kept, key=lambda im: im.path), skipped


def seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Positions of `keys` in a seeded pseudo-random order that each key keeps whatever else is in
    the list: sorted by the hash of (seed, key). A new key lands somewhere in the order; the others
    keep theirs."""
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())


def stratified_split(
    class_names: Sequence[str], ratios: Sequence[float], split_names: Sequence[str], seed: int,
    keys: Sequence[str],
) -> list[str]:
    """A split name per item: each class in its seeded order (`seeded_order` of the items' `keys`,
    their content hashes) and cut by `ratios`, within one image of exact.

    The first split takes what is left after rounding the others, so no image is lost. Because an
    item's place in the order does not depend on the others, adding images to a dataset moves
    only the few existing images at each cut to the next split (for each image added to a class,
    at most one per cut), instead of drawing every split anew: test images stay test images as a
    dataset grows, and cached features stay valid.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(class_names):
        by_class[name].append(i)
    assigned = [""] * len(class_names)
    for name in sorted(by_class):
        items = by_class[name]
        members = [items[j] for j in seeded_order([keys[i] for i in items], seed)]
        counts = [math.floor(len(members) * r + 0.5) for r in ratios[1:]]
        counts.insert(0, len(members) - sum(counts))
        if min(counts) < 1:
            need = math.ceil(1 / min(ratios))
            raise UserError(
                f"class '{name}' has {len(members)} usable images, too few to split into "
                f"{'/'.join(split_names)} with ratios {list(ratios)}; it needs about {need}: add images or drop the "
                "class"
            )
        start = 0
        for split, count in zip(split_names, counts):
            for i in members[start:start + count]:
                assigned[i] = split
            start += count
    return assigned


def group_keys(paths: Sequence[str], pattern: str | None) -> list[str]:
    """Each path's group: the first capture group of `pattern` (or its whole match) in the path;
    a path it does not match is a group of its own."""
    if pattern is None:
        return list(paths)
    regex = re.compile(pattern)
    keys = []
    for path in paths:
        match = regex.search(path)
        keys.append(f"group:{match.group(1) if regex.groups else match.group(0)}" if match else path)
    return keys


def describe_groups(paths: Sequence[str], pattern: str) -> dict:
    """How many files `index.group_by` puts in how many groups; a pattern that groups nothing is
    refused, since the user believes their patients or objects are kept together."""
    keys = [key for key in group_keys(paths, pattern) if key.startswith("group:")]
    if not keys:
        raise UserError(f"index.group_by '{pattern}' matches none of the {len(paths)} paths (e.g. {paths[0]}); "
                        "fix the pattern against the paths under data/raw/, or set it to null")
    return {"pattern": pattern, "grouped_files": len(keys), "groups": len(set(keys))}


def grouped_split(class_names: Sequence[str], groups: Sequence[str], ratios: Sequence[float],
                  split_names: Sequence[str], seed: int) -> list[str]:
    """A split name per item, every group whole in one split, each class's shares as near the
    ratios as the groups allow: the largest groups are placed first, each where its classes are
    furthest below their targets."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    names = list(members)
    shuffled = [names[i] for i in seeded_order(names, seed)]
    order = sorted(shuffled, key=lambda g: -len(members[g]))  # stable: equal sizes stay shuffled
    totals = Counter(class_names)
    placed = {split: Counter() for split in split_names}
    assigned = [""] * len(class_names)
    for group in order:
        counts = Counter(class_names[i] for i in members[group])

        def need(split_ratio, counts=counts):
            split, ratio = split_ratio
            return sum(n * (ratio * totals[c] - placed[split][c]) / totals[c] for c, n in counts.items())

        split = max(zip(split_names, ratios), key=need)[0]
        placed[split].update(counts)
        for i in members[group]:
            assigned[i] = split
    for split in split_names:
        if not placed[split]:
            raise UserError(f"index.group_by makes {len(names)} group(s) of these images, too few to fill the "
                            f"{split} split; use a pattern that makes more, smaller groups, or add data")
    return assigned


def split_by_ratios(names: list[str], keys: list[str], groups: list[str] | None, ratios: Sequence[float],
                    split_names: Sequence[str], seed: int) -> list[str]:
    if groups is None:
        return stratified_split(names, ratios, split_names, seed, keys)
    return grouped_split(names, groups, ratios, split_names, seed)


def assign_splits(images: list[Candidate], params: IndexParams) -> list[str]:
    """Each image's split: the folders' (or the CSV's) where they give val and test; otherwise
    made by the ratios, keeping each `index.group_by` group in one split."""
    names = [im.class_name for im in images]
    keys = [im.sha256 or im.path for im in images]
    groups = group_keys([im.path for im in images], params.group_by) if params.group_by else None
    folder_splits = {im.folder_split for im in images} - {None}
    if folder_splits <= {"train"}:
        return split_by_ratios(names, keys, groups, params.split_ratios, SPLITS, params.seed)
    if "train" not in folder_splits:
        raise UserError(f"the given splits are {sorted(folder_splits)}, with no train images; mark some images train")
    if groups is not None:
        folders_of: dict[str, set] = defaultdict(set)
        for image, group in zip(images, groups):
            folders_of[group].add(image.folder_split)
        straddling = [g for g, folders in folders_of.items() if len(folders) > 1]
        if straddling:
            log.warning("%d groups of index.group_by have images in more than one of the given split folders "
                        "(e.g. %s): the given splits are kept", len(straddling), sorted(straddling)[0])
    if {"val", "test"} <= folder_splits:
        return [im.folder_split for im in images]
    # One held-out folder: it becomes the test split (never used to pick a model), and val is
    # carved out of train.
    splits = ["test" if im.folder_split != "train" else "" for im in images]
    train_rows = [i for i, s in enumerate(splits) if not s]
    carved = split_by_ratios([names[i] for i in train_rows], [keys[i] for i in train_rows],
                             [groups[i] for i in train_rows] if groups else None,
                             (1 - params.val_fraction, params.val_fraction), ("train", "val"), params.seed)
    for i, split in zip(train_rows, carved):
        splits[i] = split
    return splits


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


IMBALANCE_WARNING = 3.0  # largest class over smallest: above this, accuracy hides the small classes


def imbalance_ratio(index: pd.DataFrame) -> float:
    """Images of the largest class over images of the smallest, all splits together."""
    sizes = index["class"].value_counts()
    return round(float(sizes.max() / sizes.min()), 3)


def data_summary(index: pd.DataFrame, classes: list[str], layout: str, skipped: list[dict]) -> dict:
    counts = {}
    for split in SPLITS:
        per_class = Counter(index.loc[index["split"] == split, "class"])
        counts[split] = {name: per_class.get(name, 0) for name in classes} | {"total": sum(per_class.values())}
    return {
        "layout": layout,
        "classes": len(classes),
        "images": len(index),
        "imbalance_ratio": imbalance_ratio(index),
        "counts": counts,
        "skipped": len(skipped),
        "skipped_files": sorted(skipped, key=lambda s: s["path"]),
    }


def reason_kind(reason: str) -> str:
    """The kind of a skip reason, without its particulars: 'duplicate of a.jpg' -> 'duplicate'."""
    return reason.split(":")[0].split(" (")[0].split(" of ")[0]


def skipped_summary(skipped: list[dict], examples: int = 3) -> list[str]:
    """One line per kind of skipped file, commonest first: its count and the first few files."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for entry in sorted(skipped, key=lambda s: s["path"]):
        by_kind[reason_kind(entry["reason"])].append(entry)
    lines = []
    for kind, entries in sorted(by_kind.items(), key=lambda item: (-len(item[1]), item[0])):
        shown = "; ".join(f"{e['path']} ({e['reason']})" for e in entries[:examples])
        more = f"; and {len(entries) - examples} more" if len(entries) > examples else ""
        lines.append(f"{len(entries)} skipped, {kind}: {shown}{more}")
    return lines
