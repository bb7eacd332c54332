"""Stage `features`: run the pretrained backbone once over every image.

A frozen backbone gives the same output for the same input every epoch, so the recipe's frozen
loop recomputes the same thing 25 times. Here each image is decoded once and passed through the
backbone in a few views: training images plain, mirrored and in `features.views` random
augmentations; val and test images plain, and mirrored too when `model.tta` is hflip. The head
then trains on these cached features in a fraction of a second per epoch, and the evaluate stage
scores a frozen model on them without running the backbone again (lib/features.py, the cache;
lib/extraction.py, the backbone's run over the images).

The output depends only on the data, the backbone and the augmentation, so experiments that
change the head, optimizer or strategy reuse it.
"""

from __future__ import annotations

import torch

from stages.lib.backbones import load_pretrained_backbone
from stages.lib.cli import run_stage
from stages.lib.extraction import augmentation_preview, extract_split, inference_graph
from stages.lib.features import save_features
from stages.lib.files import file_sha256
from stages.lib.index_table import read_split
from stages.lib.params import load_params
from stages.lib.paths import AUGMENTATIONS_PNG, PRETRAINED
from stages.lib.plots import save_view_grid
from stages.lib.runtime import pick_device


def main() -> None:
    params = load_params()
    device = pick_device()
    backbone, prep = load_pretrained_backbone(PRETRAINED, device)
    example = torch.zeros(params.features.batch_size, 3, prep.input_size, prep.input_size, device=device)
    backbone = inference_graph(backbone, example.contiguous(memory_format=torch.channels_last))
    # Which pretrained file made these features: they serve only a model built on it.
    source = {"backbone": params.model.backbone, "pretrained_sha256": file_sha256(PRETRAINED),
              "preprocessing": prep.to_dict()}
    for split in ("train", "val", "test"):
        torch.manual_seed(params.features.seed)
        save_features(split, {**source, **extract_split(split, backbone, prep, params, device)})
    save_view_grid(*augmentation_preview(read_split("train"), prep, params), AUGMENTATIONS_PNG,
                   "what the network sees in training: the plain view, then random augmentations (augment params)")


if __name__ == "__main__":
    run_stage(main)
