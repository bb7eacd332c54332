"""Images on their way into a network: the index, transforms, datasets, samplers and loaders."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stages.lib.cli import die_with_parent
from stages.lib.cores import loader_workers
from stages.lib.images import load_image
from stages.lib.params import AugmentParams
from stages.lib.paths import RAW_DIR
from stages.lib.preprocessing import Preprocessing

# torchvision is imported where it is used: it takes seconds to import, and the stages that work
# on cached features never transform an image.

def normalize(prep: Preprocessing):
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(prep.mean, prep.std)])


def eval_transform(prep: Preprocessing):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interpolation = InterpolationMode(prep.interpolation)
    return T.Compose([T.Resize(prep.resize_size, interpolation=interpolation), T.CenterCrop(prep.input_size),
                      normalize(prep)])


def train_transform(prep: Preprocessing, augment: AugmentParams):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interpolation = InterpolationMode(prep.interpolation)
    steps = [
        T.RandomResizedCrop(prep.input_size, scale=tuple(augment.crop_scale), interpolation=interpolation),
        T.RandomHorizontalFlip(augment.hflip),
    ]
    if augment.rotation:
        steps.append(T.RandomRotation(augment.rotation, interpolation=interpolation))
    if augment.color_jitter:
        steps.append(T.ColorJitter(augment.color_jitter, augment.color_jitter, augment.color_jitter))
    if augment.policy == "trivial":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation))
    elif augment.policy == "rand":
        steps.append(T.RandAugment(interpolation=interpolation))
    steps.append(normalize(prep))
    if augment.erasing:
        steps.append(T.RandomErasing(augment.erasing))  # on the normalised tensor: erased pixels become 0, the mean
    return T.Compose(steps)


class ImageDataset(Dataset):
    """Rows of the index as (image tensor, label) pairs.

    Items are asked for as (epoch, index) pairs (see EpochSampler), and random transforms draw
    from torch's generator seeded by (seed, epoch, index): an epoch's augmentations are the same
    whatever the number of loader workers, and a resumed run repeats them exactly.
    """

    def __init__(self, rows: pd.DataFrame, transform, decode_size: int | None, seed: int = 0):
        self.paths = [RAW_DIR / p for p in rows["path"]]
        self.labels = rows["label"].tolist()
        self.transform = transform
        self.decode_size = decode_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        image = load_image(self.paths[i], self.decode_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, i))
            return self.transform(image), self.labels[i]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


class EpochSampler(Sampler):
    """One epoch's items as (epoch, index) pairs, shuffled by (seed, epoch), so that any epoch can
    be replayed exactly: after a restart, or on another number of workers. With `world_size` > 1
    each process takes every world_size-th item from `rank` on, the order padded by repeating its
    start to a multiple of world_size (as DistributedSampler does), so every process runs the same
    number of steps."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None):
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.weights = weights  # per item: draw `size` items with replacement by these (class-balanced)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, 0))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        padded = order.tolist()
        padded += padded[: len(self) * self.world_size - self.size]
        return iter([(self.epoch, i) for i in padded[self.rank :: self.world_size]])


def decode_size(prep: Preprocessing, augmented: bool = False) -> int:
    """The smallest size a JPEG may decode at: the evaluation resize, or twice that for random
    crops, which may zoom in and should stay sharp."""
    return 2 * prep.resize_size if augmented else prep.resize_size


def seed_worker(worker_id: int) -> None:
    # A worker goes with its stage at once (torch's own check of the parent takes up to 5 s).
    die_with_parent()
    # Each worker's torch seed is derived from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int, pin_memory: bool,
                seed: int = 0, persistent: bool = True) -> DataLoader:
    """Worker processes decode and augment ahead of the model (several batches each), pinned
    memory lets a GPU copy overlap compute, and persistent workers skip a restart per epoch.
    No sampler: the dataset in order. The workers' seeds come from `seed`, not from torch's global
    generator, whose draws (dropout) must not depend on when a loader starts. At most one worker
    per core the stage may use (lib/cores.py)."""
    workers = loader_workers(workers)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed), persistent_workers=persistent and workers > 0,
        pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
    )


class PathDataset(torch.utils.data.Dataset):
    """(image tensor or None, error message) per path: a bad file is reported, not raised."""

    def __init__(self, paths: list[Path], transform, decode_size: int):
        self.paths, self.transform, self.decode_size = paths, transform, decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i], self.decode_size)), ""
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported in the CSV
            return None, f"{type(error).__name__}: {error}".splitlines()[0]


def collate_readable(items):
    """Stack the images that decoded; keep every item's error (empty when fine)."""
    images = [image for image, _ in items if image is not None]
    return (torch.stack(images) if images else None), [error for _, error in items]
