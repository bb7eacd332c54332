"""Stage `export`: the best model as ONNX, for serving without this project.

Writes models/export/ with
- model.onnx:  ONNX (ONNX Runtime, TensorRT, OpenVINO, ...), batch size dynamic: a float32 NCHW
               batch scaled to 0..1 and normalised with the sidecar's mean and std in, class
               probabilities (temperature and softmax included) out;
- model.json:  what a caller needs: class names in output order, input size, resize size,
               normalisation mean and std, interpolation, and the input and output names;
- predict.py, images.py, requirements.txt, README.md: a predictor that needs only onnxruntime,
               numpy and pillow (lib/serve.py and the pipeline's own decoding, lib/images.py),
               so the folder alone classifies images: `python predict.py PATH...`.
No TorchScript: torch has deprecated it, ONNX runs in every serving runtime, and a PyTorch user
has models/model.safetensors (docs/model.md).

When the model's backbone is still exactly the pretrained one (strategy frozen, or a finetune run
whose best epoch was a head epoch), the backbone part is the one the export_backbone stage made
once for these weights, and the head part is written from the checkpoint's arrays: an experiment
that changes only the head exports in well under a second, without torch. Any other backbone is
exported here, by torch (lib/export.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import run_stage
from stages.lib.export import MODEL_JSON, export_backbone, join_with_head, reusable_backbone_export, sidecar
from stages.lib.export_folder import write_predictor
from stages.lib.files import atomic_dir, write_json_atomic
from stages.lib.paths import BACKBONE_EXPORT_DIR, EXPORT_DIR, MODEL

log = logging.getLogger("export")


def main() -> None:
    checkpoint = read_checkpoint(MODEL)
    with atomic_dir(EXPORT_DIR) as tmp, tempfile.TemporaryDirectory() as scratch:
        if reusable_backbone_export(BACKBONE_EXPORT_DIR, checkpoint):
            log.info("the backbone is the pretrained one: joining its export (%s) with the head", BACKBONE_EXPORT_DIR)
            backbone_folder = BACKBONE_EXPORT_DIR
        else:
            backbone_folder = Path(scratch)
            export_backbone(checkpoint.classifier().backbone, checkpoint.preprocessing.input_size, backbone_folder)
        join_with_head(backbone_folder, checkpoint.head_layers(), checkpoint.temperature, tmp)
        write_json_atomic(tmp / MODEL_JSON, sidecar(checkpoint))
        write_predictor(tmp)
    log.info("%s (epoch %d) exported to %s: model.onnx, model.json, predict.py (python predict.py PATH...)",
             checkpoint.backbone, checkpoint.epoch, EXPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
