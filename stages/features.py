"""Stage `features`: run the pretrained backbone once over the train and val images.

A frozen backbone gives the same output for the same input every epoch, so the recipe's frozen
loop recomputes the same thing 25 times. Here each image is decoded once and passed through the
backbone in a few views (plain, mirrored, and `features.views` random training augmentations);
the head then trains on these cached features in a fraction of a second per epoch. The output
depends only on the data, the backbone and augmentation params, so experiments that change the
head, optimizer or strategy reuse it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.cli import run_stage
from stages.data import decode_size, eval_transform, load_image, RAW_DIR, read_split, train_transform
from stages.files import save_torch_atomic
from stages.models import Preprocessing, create_backbone, pick_device, resolve_backbone
from stages.params import load_params
from stages.weights import PRETRAINED

log = logging.getLogger("features")

FEATURES = Path("data/features.pt")


class MultiViewDataset(Dataset):
    """Each image decoded once, returned as a stack of views: plain, mirrored, then augmented."""

    def __init__(self, paths: list[str], plain, augmented, views: int, min_size: int):
        self.paths, self.plain, self.augmented, self.views, self.min_size = paths, plain, augmented, views, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(RAW_DIR / self.paths[i], self.min_size)
        plain = self.plain(image)
        return torch.stack([plain, plain.flip(-1)] + [self.augmented(image) for _ in range(self.views)])


def load_backbone(device: torch.device, channels_last: bool = True) -> tuple[torch.nn.Module, Preprocessing]:
    pretrained = torch.load(PRETRAINED, map_location="cpu", weights_only=True)
    backbone, _ = create_backbone(resolve_backbone(pretrained["backbone"]))
    if pretrained["state_dict"] is not None:
        backbone.load_state_dict(pretrained["state_dict"])
    backbone.eval().to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return backbone, Preprocessing.from_dict(pretrained["preprocessing"])


@torch.inference_mode()
def extract(backbone: torch.nn.Module, dataset: MultiViewDataset, images_per_batch: int, device: torch.device, desc: str) -> torch.Tensor:
    """Features of shape [images, views, width]."""
    out = []
    for batch in tqdm(DataLoader(dataset, batch_size=images_per_batch), desc=desc, unit="batch", disable=None):
        n, v = batch.shape[:2]
        flat = batch.flatten(0, 1).to(device, memory_format=torch.channels_last)
        out.append(backbone(flat).float().cpu().view(n, v, -1))
    return torch.cat(out)


def main() -> None:
    params = load_params()
    device = pick_device()
    backbone, prep = load_backbone(device)
    torch.manual_seed(params.features.seed)
    result = {"backbone": params.model.backbone, "preprocessing": prep.to_dict(), "views": ["plain", "hflip"]}
    for split, extra_views in (("train", params.features.views), ("val", 0)):
        rows = read_split(split)
        dataset = MultiViewDataset(
            rows["path"].tolist(), eval_transform(prep), train_transform(prep, params.augment), extra_views, decode_size(prep)
        )
        per_batch = max(1, params.features.batch_size // (2 + extra_views))
        result[split] = {
            "features": extract(backbone, dataset, per_batch, device, f"features {split}"),
            "labels": torch.tensor(rows["label"].tolist()),
            "paths": rows["path"].tolist(),
        }
        log.info("%s: %d images x %d views -> %s", split, len(rows), 2 + extra_views, tuple(result[split]["features"].shape))
    save_torch_atomic(FEATURES, result)


if __name__ == "__main__":
    run_stage(main)
