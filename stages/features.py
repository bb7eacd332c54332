"""Stage `features`: run the pretrained backbone once over every image.

A frozen backbone gives the same output for the same input every epoch, so the recipe's frozen
loop recomputes the same thing 25 times. Here each image is decoded once and passed through the
backbone in a few views: training images plain, mirrored and in `features.views` random
augmentations; val and test images plain, and mirrored too when `model.tta` is hflip. The head
then trains on these cached features in a fraction of a second per epoch, and the evaluate stage
scores a frozen model on them without running the backbone again (lib/features.py, the cache;
lib/extraction.py, the backbone's run over the images).

The output depends only on the data, the backbone and the augmentation, so experiments that
change the head, optimizer or strategy reuse it. Each image's vectors are also kept between runs
in data/cache/features/ (lib/feature_cache.py): when images are added or changed, only those go
through the backbone, and the outputs are those a run from an empty cache writes.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

from stages.lib.backbones import pretrained_backbone, read_pretrained_and_sha256
from stages.lib.cli import run_stage
from stages.lib.extraction import augmentation_preview, extract_split, inference_graph
from stages.lib.feature_cache import prune, setting_key
from stages.lib.features import save_features
from stages.lib.index_table import read_split
from stages.lib.params import load_params
from stages.lib.paths import AUGMENTATIONS_PNG, FEATURE_CACHE, PRETRAINED
from stages.lib.plots import save_view_grid
from stages.lib.preprocessing import Preprocessing
from stages.lib.runtime import pick_device

log = logging.getLogger("features")


def main() -> None:
    params = load_params()
    device = pick_device()
    pretrained, pretrained_sha256 = read_pretrained_and_sha256(PRETRAINED)
    prep = Preprocessing.from_dict(pretrained["preprocessing"])

    @cache
    def backbone():
        # Built only when some image is not in the cache yet.
        network, _ = pretrained_backbone(pretrained, device)
        example = torch.zeros(params.features.batch_size, 3, prep.input_size, prep.input_size, device=device)
        return inference_graph(network, example.contiguous(memory_format=torch.channels_last))

    # Which pretrained file made these features: they serve only a model built on it.
    source = {"backbone": params.model.backbone, "pretrained_sha256": pretrained_sha256,
              "preprocessing": prep.to_dict()}
    setting = setting_key(pretrained_sha256, prep)
    used: set[Path] = set()
    for split in ("train", "val", "test"):
        features, files = extract_split(split, backbone, prep, params, device, FEATURE_CACHE / setting)
        save_features(split, {**source, **features})
        used |= files
    files, size = prune(FEATURE_CACHE, {setting}, used)
    log.info("%s: %d vectors, %.1f MB (only this backbone's and these images')", FEATURE_CACHE, files, size / 1e6)
    save_view_grid(*augmentation_preview(read_split("train"), prep, params), AUGMENTATIONS_PNG,
                   "what the network sees in training: the plain view, then random augmentations (augment params)")


if __name__ == "__main__":
    run_stage(main)
