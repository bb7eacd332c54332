"""Stage `export`: the best model as TorchScript and ONNX, for serving without this project.

Writes models/export/ with
- model.ts:    TorchScript (torch.jit.load, no model code needed),
- model.onnx:  ONNX (ONNX Runtime, TensorRT, OpenVINO, ...), batch size dynamic,
- model.json:  what a caller needs: class names in output order, input size, resize size,
               normalisation mean and std, interpolation, and the input and output names.
Both networks take a float32 NCHW batch scaled to 0..1 and normalised with the sidecar's mean and
std, and return class probabilities (softmax included), so their outputs can be compared directly.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from stages.cli import run_stage
from stages.files import atomic_dir, write_json_atomic
from stages.models import Preprocessing, classifier_from_checkpoint, load_checkpoint
from stages.paths import EXPORT_DIR, MODEL

log = logging.getLogger("export")

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
ONNX_OPSET = 17


def probability_model(checkpoint: dict) -> nn.Module:
    return nn.Sequential(classifier_from_checkpoint(checkpoint), nn.Softmax(dim=1)).eval()


def sidecar(checkpoint: dict, prep: Preprocessing) -> dict:
    return {
        "classes": checkpoint["classes"],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, prep.input_size, prep.input_size], "dtype": "float32",
                  "layout": "NCHW, RGB, scaled to 0..1, then (x - mean) / std"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(checkpoint["classes"])], "meaning": "class probabilities"},
        "input_size": prep.input_size,
        "resize_size": prep.resize_size,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "preprocessing": f"resize the short side to {prep.resize_size} px ({prep.interpolation}), "
                         f"center-crop {prep.input_size} px",
        "backbone": checkpoint["backbone"],
        "strategy": checkpoint["strategy"],
        "epoch": checkpoint["epoch"],
        "onnx_opset": ONNX_OPSET,
    }


def main() -> None:
    checkpoint = load_checkpoint(MODEL)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    model = probability_model(checkpoint)
    example = torch.rand(2, 3, prep.input_size, prep.input_size)
    with atomic_dir(EXPORT_DIR) as tmp, warnings.catch_warnings(), torch.no_grad():
        # torch marks TorchScript and the tracing ONNX exporter deprecated, in favour of
        # torch.export; the files they write load in every runtime people serve with today.
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(tmp / "model.ts"))
        torch.onnx.export(model, (example,), str(tmp / "model.onnx"), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        write_json_atomic(tmp / "model.json", sidecar(checkpoint, prep))
    log.info("%s (epoch %d) exported to %s: model.ts, model.onnx, model.json",
             checkpoint["backbone"], checkpoint["epoch"], EXPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
