"""Stage `export_backbone`: the pretrained backbone alone as TorchScript and ONNX (images -> features).

Made once per backbone and weights, like the features: the export stage joins it with each
experiment's head when the model's backbone is still the pretrained one, instead of building and
tracing the whole network again for an experiment that changed only the head.
"""

from __future__ import annotations

import logging

import torch

from stages.cli import run_stage
from stages.export import BACKBONE_JSON, export_backbone
from stages.files import atomic_dir, file_sha256, write_json_atomic
from stages.models import load_pretrained_backbone
from stages.paths import BACKBONE_EXPORT_DIR, PRETRAINED

log = logging.getLogger("export_backbone")


def main() -> None:
    backbone, prep = load_pretrained_backbone(PRETRAINED, torch.device("cpu"))
    with atomic_dir(BACKBONE_EXPORT_DIR) as tmp:
        export_backbone(backbone, prep.input_size, tmp)
        # Which weights these are: the export stage reuses them only for a backbone with exactly these.
        write_json_atomic(tmp / BACKBONE_JSON, {"pretrained_sha256": file_sha256(PRETRAINED),
                                                "input_size": prep.input_size})
    log.info("backbone exported to %s", BACKBONE_EXPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
