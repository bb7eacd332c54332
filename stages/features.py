"""Stage `features`: run the pretrained backbone once over every image.

A frozen backbone gives the same output for the same input every epoch, so the recipe's frozen
loop recomputes the same thing 25 times. Here each image is decoded once and passed through the
backbone in a few views: training images plain, mirrored and in `features.views` random
augmentations; val and test images plain, and mirrored too when `evaluate.tta` is hflip. The head
then trains on these cached features in a fraction of a second per epoch, and the evaluate stage
scores a frozen model on them without running the backbone again.

One file per split (data/features/{train,val,test}.pt), so dvc.yaml shows that the train stage
reads only train and val. The output depends only on the data, the backbone and the augmentation,
so experiments that change the head, optimizer or strategy reuse it.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.cli import run_stage
from stages.data import decode_size, eval_transform, load_image, make_loader, read_split, train_transform
from stages.files import file_sha256, save_torch_atomic
from stages.models import Preprocessing, load_pretrained_backbone, pick_device
from stages.params import Params, load_params
from stages.paths import PRETRAINED, RAW_DIR, features_file

log = logging.getLogger("features")


class MultiViewDataset(Dataset):
    """Each image decoded once, returned as a stack of views: plain, [mirrored], then augmented."""

    def __init__(self, paths: list[str], plain, augmented, mirrored: bool, views: int, min_size: int):
        self.paths, self.plain, self.augmented = paths, plain, augmented
        self.mirrored, self.views, self.min_size = mirrored, views, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(RAW_DIR / self.paths[i], self.min_size)
        plain = self.plain(image)
        stack = [plain, plain.flip(-1)] if self.mirrored else [plain]
        return torch.stack(stack + [self.augmented(image) for _ in range(self.views)])


def view_names(mirrored: bool, augmented: int) -> list[str]:
    return ["plain"] + (["hflip"] if mirrored else []) + [f"augmented_{i}" for i in range(augmented)]


def split_views(split: str, params: Params) -> tuple[bool, int]:
    """(mirrored, augmented views) for a split: training images get every view; val and test
    images one, or two when test-time augmentation averages in the mirror image."""
    if split == "train":
        return True, params.features.views
    return params.evaluate.tta == "hflip", 0


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
        out.append(backbone(flat).float().cpu().view(n, v, -1))
    return torch.cat(out)


def split_features(split: str, backbone, prep: Preprocessing, params: Params, device: torch.device) -> dict:
    rows = read_split(split)
    mirrored, augmented = split_views(split, params)
    dataset = MultiViewDataset(rows["path"].tolist(), eval_transform(prep), train_transform(prep, params.augment),
                               mirrored, augmented, decode_size(prep, augmented > 0))
    views = view_names(mirrored, augmented)
    # batch_size counts backbone inputs: small batches run faster on CPU (they stay in cache).
    images_per_batch = max(1, params.features.batch_size // len(views))
    loader = make_loader(dataset, images_per_batch, None, params.features.workers, device.type == "cuda",
                         params.features.seed, persistent=False)
    features = extract(backbone, loader, device, f"features {split}")
    log.info("%s: %d images x %d views -> %s", split, len(rows), len(views), tuple(features.shape))
    return {"views": views, "features": features, "labels": torch.tensor(rows["label"].tolist()),
            "paths": rows["path"].tolist()}


def main() -> None:
    params = load_params()
    device = pick_device()
    backbone, prep = load_pretrained_backbone(PRETRAINED, device)
    example = torch.zeros(params.features.batch_size, 3, prep.input_size, prep.input_size, device=device)
    backbone = inference_graph(backbone, example.contiguous(memory_format=torch.channels_last))
    # Which pretrained file made these features: evaluate uses them only for a model built on it.
    source = {"backbone": params.model.backbone, "pretrained_sha256": file_sha256(PRETRAINED),
              "preprocessing": prep.to_dict()}
    for split in ("train", "val", "test"):
        torch.manual_seed(params.features.seed)
        save_torch_atomic(features_file(split), {**source, **split_features(split, backbone, prep, params, device)})


if __name__ == "__main__":
    run_stage(main)
