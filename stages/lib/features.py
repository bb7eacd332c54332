"""The feature cache: the pretrained backbone's outputs per image and view, one file per split.

The features stage writes data/features/{train,val,test}.safetensors (lib/extraction.py fills
them); the train stage reads train and val (the head trains on them), evaluate reads test for a
model whose backbone is the pretrained one, leaks reads all three. Each file records the sha256
of the pretrained weights that made it, so it serves only a model built on exactly those.
Reading the cache and scoring a head on it take numpy alone: no torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.lib.cli import UserError
from stages.lib.files import read_tensors, save_tensors_atomic
from stages.lib.head import feature_probabilities
from stages.lib.paths import PRETRAINED, features_file

log = logging.getLogger("features")


def save_features(split: str, cache: dict) -> None:
    """`cache`: features [images, views, width] and labels [images] (arrays or tensors), and the
    views, paths, pretrained_sha256 and what else describes them."""
    tensors = {name: cache[name] for name in ("features", "labels")}
    save_tensors_atomic(features_file(split), tensors, {k: v for k, v in cache.items() if k not in tensors})


@dataclass(frozen=True)
class OnDisk:
    """A float32 array [images, views, width] in a features file, read piece by piece: indexing
    it with (images, views), each an index array, a slice or an int, reads only those vectors, by
    positioned reads of the file (os.pread, one per run of consecutive vectors). Not a memory map:
    the page cache a map touches counts in the process's resident memory, whole large folios of it
    on recent kernels (200 MB for 256 vectors scattered over a 300 MB file, measured). The head
    trains and scores batch by batch on it, so a stage's memory does not grow with the number of
    images."""

    path: Path
    offset: int  # of the array's first byte in the file
    shape: tuple[int, ...]

    def __getitem__(self, key) -> np.ndarray:
        images, views = key
        count, per_image, width = self.shape
        images = np.arange(count)[images] if isinstance(images, slice) else np.asarray(images)
        images, views = np.broadcast_arrays(images, np.asarray(views))
        rows = (images * per_image + views).ravel()
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # runs of consecutive vectors
        ends = np.append(starts[1:], len(ordered))
        read = np.empty((len(rows), width), np.float32)
        row_bytes = width * 4
        with self.path.open("rb", buffering=0) as file:
            for start, end in zip(starts.tolist(), ends.tolist()):
                data = os.pread(file.fileno(), (end - start) * row_bytes, self.offset + int(ordered[start]) * row_bytes)
                read[start:end] = np.frombuffer(data, np.float32).reshape(end - start, width)
        out = np.empty_like(read)
        out[order] = read
        return out.reshape(*images.shape, width)

    def __len__(self) -> int:
        return self.shape[0]


def features_on_disk(path: Path) -> OnDisk:
    """The features array of a file save_tensors_atomic wrote, where its header says it lies."""
    with path.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        entry = json.loads(file.read(header_size))["features"]
    if entry["dtype"] != "F32":
        raise ValueError(f"features stored as {entry['dtype']}, not F32")
    return OnDisk(path, 8 + header_size + entry["data_offsets"][0], tuple(entry["shape"]))


def read_features(split: str, in_memory: bool = False) -> dict:
    """A split's cache: features [images, views, width] (float32: OnDisk, or with `in_memory` a
    numpy array) and labels (numpy), and its views, paths and pretrained_sha256."""
    path = features_file(split)
    if not path.is_file():
        raise UserError(f"{path}: not found; run the features stage first (dvc repro)")
    try:
        if in_memory:
            tensors, meta = read_tensors(path)
        else:
            tensors, meta = read_tensors(path, names=("labels",))
            tensors["features"] = features_on_disk(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file means the same here
        raise UserError(f"{path}: not a feature cache this code reads ({str(error).splitlines()[0]}); "
                        "run dvc repro to rebuild it") from None
    return {**meta, **tensors}


def read_head_features(pretrained_sha256: str) -> tuple[dict, dict]:
    """The train and val features, checked to come from the pretrained file with this sha256."""
    train, val = read_features("train"), read_features("val")
    if train["pretrained_sha256"] != pretrained_sha256:
        raise UserError(f"{features_file('train')}: computed with other pretrained weights than {PRETRAINED}; "
                        "run dvc repro to bring the features stage up to date")
    return train, val


def usable_features(checkpoint, split: str, paths: list[str]) -> dict | None:
    """The split's cached features, if they are exactly what the model's backbone gives on these
    images, with the views its test-time augmentation needs; else None."""
    path = features_file(split)
    if checkpoint.pretrained_backbone_sha256 is None or not path.is_file():
        return None
    cached = read_features(split)
    has_views = "plain" in cached["views"] and (checkpoint.tta != "hflip" or "hflip" in cached["views"])
    if checkpoint.uses_pretrained_backbone(cached["pretrained_sha256"]) and cached["paths"] == paths and has_views:
        return cached
    return None


def split_probabilities(checkpoint, split: str, rows, batch_size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated class probabilities and labels of a split's rows: the head on the cached
    features when they serve this model (its backbone is the pretrained one), else the whole
    model on the images."""
    cached = usable_features(checkpoint, split, rows["path"].tolist())
    if cached is not None:
        log.info("the backbone is the pretrained one: scoring the head on the cached %s features", split)
        return feature_probabilities(checkpoint.head_layers(), cached, checkpoint.tta), cached["labels"]
    # torch is imported only here: a model scored on the cached features runs without it.
    from stages.lib.inference import image_probabilities

    return image_probabilities(checkpoint, rows, batch_size, workers, desc=f"scoring {split}")
