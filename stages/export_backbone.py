"""Stage `export_backbone`: the pretrained backbone alone as ONNX (images -> features).

Made once per backbone and weights, like the features: the export stage joins it with each
experiment's head when the model's backbone is still the pretrained one, instead of building and
tracing the whole network again for an experiment that changed only the head.
"""

from __future__ import annotations

import logging

import torch

from stages.lib.backbones import load_pretrained_backbone
from stages.lib.cli import run_stage
from stages.lib.export import export_backbone, write_backbone_record
from stages.lib.files import atomic_dir, file_sha256
from stages.lib.paths import BACKBONE_EXPORT_DIR, PRETRAINED

log = logging.getLogger("export_backbone")


def main() -> None:
    backbone, prep = load_pretrained_backbone(PRETRAINED, torch.device("cpu"))
    with atomic_dir(BACKBONE_EXPORT_DIR) as tmp:
        export_backbone(backbone, prep.input_size, tmp)
        write_backbone_record(tmp, file_sha256(PRETRAINED), prep.input_size)
    log.info("backbone exported to %s", BACKBONE_EXPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
