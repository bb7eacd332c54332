"""Filling the feature cache: the pretrained backbone run over every image of a split, in the
views the head trains and is scored on (lib/features.py reads the cache)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.lib.data import decode_size, eval_transform, make_loader, train_transform
from stages.lib.feature_cache import entry_paths, filled, view_key
from stages.lib.images import load_image
from stages.lib.index_table import read_split
from stages.lib.params import Params
from stages.lib.paths import RAW_DIR
from stages.lib.preprocessing import Preprocessing

log = logging.getLogger("features")


class MultiViewDataset(Dataset):
    """Each image decoded once, returned as a stack of views: plain, [mirrored], then augmented.
    The i-th augmented view of an image is drawn from a generator seeded by (seed, the image's
    content hash, i): the same whatever other images are in the run, the batch or the worker."""

    def __init__(self, paths: list[str], sha256s: list[str], plain, augmented, mirrored: bool, views: int,
                 min_size: int, seed: int):
        self.paths, self.sha256s, self.plain, self.augmented = paths, sha256s, plain, augmented
        self.mirrored, self.views, self.min_size, self.seed = mirrored, views, min_size, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(RAW_DIR / self.paths[i], self.min_size)
        plain = self.plain(image)
        stack = [plain, plain.flip(-1)] if self.mirrored else [plain]
        for view in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, self.sha256s[i], view))
                stack.append(self.augmented(image))
        return torch.stack(stack)


def view_seed(seed: int, sha256: str, view: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sha256}:{view}".encode()).digest()[:8], "little")


def view_names(mirrored: bool, augmented: int) -> list[str]:
    return ["plain"] + (["hflip"] if mirrored else []) + [f"augmented_{i}" for i in range(augmented)]


def split_views(split: str, params: Params) -> tuple[bool, int]:
    """(mirrored, augmented views) for a split: training images get every view; val and test
    images one, or two when test-time augmentation averages in the mirror image."""
    if split == "train":
        return True, params.features.views
    return params.model.tta == "hflip", 0


def inference_graph(backbone: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The backbone traced and frozen for inference: freezing folds each BatchNorm into the
    convolution before it, which makes an EfficientNet-Lite forward pass about 1.4x faster on CPU.
    Outputs agree with the eager backbone to float rounding (tests/test_features.py checks).
    torch marks torch.jit deprecated; where it is gone or a backbone does not trace, stay eager."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.jit.freeze(torch.jit.trace(backbone, example, check_trace=False))
    except Exception as error:  # noqa: BLE001 - any failure here only costs speed
        log.info("running the backbone eagerly (%s: %s)", type(error).__name__, str(error).splitlines()[0])
        return backbone


@torch.inference_mode()
def extract(backbone: torch.nn.Module, loader: DataLoader, device: torch.device, desc: str) -> torch.Tensor:
    """Features of shape [images, views, width]."""
    out = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=None):
        n, v = batch.shape[:2]
        flat = batch.flatten(0, 1).to(device, non_blocking=True, memory_format=torch.channels_last)
        # CPU kernels give an input the same bits in any batch of two or more, but other bits
        # alone (2.6e-6 apart on Lite2): a lone input runs doubled, so that an image's features
        # do not depend on which images share its batch, and a run that computes only new images
        # writes what a run from an empty cache writes.
        features = backbone(flat.repeat(2, 1, 1, 1))[:1] if len(flat) == 1 else backbone(flat)
        out.append(features.float().cpu().view(n, v, -1))
    return torch.cat(out)


def extract_split(split: str, backbone: Callable[[], torch.nn.Module], prep: Preprocessing, params: Params,
                  device: torch.device, cache: Path) -> tuple[dict, set[Path]]:
    """A split's features [images, views, width], from the per-image cache (lib/feature_cache.py)
    where it has them; the backbone (`backbone()` builds it, only if needed) runs on the other
    images, whose vectors then join the cache. Also the cache files the split uses."""
    rows = read_split(split)
    paths, sha256s = rows["path"].tolist(), rows["sha256"].tolist()
    mirrored, augmented = split_views(split, params)
    views = view_names(mirrored, augmented)
    keys = [view_key(view, params.augment, params.features.seed) for view in views]

    def through_backbone(missing: list[int]) -> np.ndarray:
        dataset = MultiViewDataset([paths[i] for i in missing], [sha256s[i] for i in missing], eval_transform(prep),
                                   train_transform(prep, params.augment), mirrored, augmented,
                                   decode_size(prep, augmented > 0), params.features.seed)
        # batch_size counts backbone inputs: small batches run faster on CPU (they stay in cache).
        images_per_batch = max(1, params.features.batch_size // len(views))
        loader = make_loader(dataset, images_per_batch, None, params.features.workers, device.type == "cuda",
                             params.features.seed, persistent=False)
        return extract(backbone(), loader, device, f"features {split}").numpy()

    features, missing = filled(cache, keys, sha256s, through_backbone)
    used = entry_paths(cache, keys, sha256s)
    log.info("%s: %d images x %d views -> %s (%d images through the backbone, %d from %s)", split, len(rows),
             len(views), tuple(features.shape), len(missing), len(rows) - len(missing), cache.parent)
    return {"views": views, "features": features, "labels": np.asarray(rows["label"].tolist(), dtype=np.int64),
            "paths": paths}, used


def augmentation_preview(rows, prep: Preprocessing, params: Params, images: int = 4, views: int = 5):
    """For the first training images: the plain view, then random training augmentations, as
    HxWx3 arrays in 0..1, with a title per image. Drawn from its own seeded generator, so the
    features (computed before) and this picture are reproducible."""
    plain, augmented = eval_transform(prep), train_transform(prep, params.augment)
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    grid, titles = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.features.seed)
        for path, name in zip(rows["path"][:images], rows["class"][:images]):
            image = load_image(RAW_DIR / path, decode_size(prep, True))
            tensors = [plain(image)] + [augmented(image) for _ in range(views)]
            grid.append([(t * std + mean).permute(1, 2, 0).numpy() for t in tensors])
            titles.append(f"{name}: {path}")
    return grid, titles
