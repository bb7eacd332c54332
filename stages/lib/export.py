"""Models as ONNX files, for serving without this project.

Each exported file is a backbone part (images -> features) joined with a head part (features ->
probabilities, softmax included). The backbone part of the pretrained weights is exported once
(the export_backbone stage) and reused for every model whose backbone is still exactly those
weights; any other backbone is exported on the spot.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx.compose
import torch
from torch import nn

from stages.lib.checkpoint import Checkpoint

INPUT_NAME, FEATURES_NAME, OUTPUT_NAME = "image", "features", "probabilities"
ONNX_OPSET = 17
BACKBONE_ONNX, BACKBONE_JSON = "backbone.onnx", "backbone.json"
MODEL_ONNX, MODEL_JSON = "model.onnx", "model.json"


class Temperature(nn.Module):
    """Class scores divided by the temperature fitted on the val split (lib/calibration.py)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


def with_softmax(model: nn.Module, temperature: float) -> nn.Module:
    """What the exported model computes: the model's class scores turned into calibrated probabilities."""
    return nn.Sequential(model, Temperature(temperature), nn.Softmax(dim=1)).eval()


def probability_model(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network in PyTorch, computing what the exported files compute."""
    return with_softmax(checkpoint.classifier(), checkpoint.temperature)


@contextmanager
def quiet_exporters():
    # torch marks the tracing ONNX exporter deprecated, in favour of torch.export; the files it
    # writes load in every runtime people serve with today.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def export_onnx(module: nn.Module, example: torch.Tensor, target, input_name: str, output_name: str) -> None:
    torch.onnx.export(module, (example,), target, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


def export_backbone(backbone: nn.Module, input_size: int, folder: Path) -> None:
    """backbone.onnx in `folder`: images -> features, batch size dynamic."""
    backbone = backbone.eval().to(memory_format=torch.contiguous_format)
    with quiet_exporters():
        export_onnx(backbone, torch.rand(2, 3, input_size, input_size), str(folder / BACKBONE_ONNX), INPUT_NAME,
                    FEATURES_NAME)


def join_with_head(backbone_folder: Path, head: nn.Module, temperature: float, folder: Path) -> None:
    """model.onnx in `folder`: the backbone's export followed by the head, the temperature and a
    softmax."""
    head = head.eval()
    width = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
    buffer = io.BytesIO()
    with quiet_exporters():
        export_onnx(with_softmax(head, temperature), torch.rand(2, width), buffer, FEATURES_NAME, OUTPUT_NAME)
    joined = onnx.compose.merge_models(onnx.load(str(backbone_folder / BACKBONE_ONNX)),
                                       onnx.load_from_string(buffer.getvalue()),
                                       io_map=[(FEATURES_NAME, FEATURES_NAME)])
    onnx.save(joined, str(folder / MODEL_ONNX))


def write_backbone_record(folder: Path, pretrained_sha256: str, input_size: int) -> None:
    """Which weights a backbone export holds: it is reused only for a backbone of exactly these."""
    (folder / BACKBONE_JSON).write_text(json.dumps({"pretrained_sha256": pretrained_sha256, "input_size": input_size},
                                                   indent=2) + "\n")


def reusable_backbone_export(folder: Path, checkpoint: Checkpoint) -> bool:
    """True when `folder` holds the export of exactly this model's (pretrained) backbone."""
    record = folder / BACKBONE_JSON
    return record.is_file() and checkpoint.uses_pretrained_backbone(json.loads(record.read_text())["pretrained_sha256"])


def sidecar(checkpoint: Checkpoint) -> dict:
    prep = checkpoint.preprocessing
    return {
        "classes": checkpoint.classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, prep.input_size, prep.input_size], "dtype": "float32",
                  "layout": "NCHW, RGB, scaled to 0..1, then (x - mean) / std"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(checkpoint.classes)],
                   "meaning": "class probabilities, temperature-scaled (softmax of the class scores / temperature)"},
        "temperature": checkpoint.temperature,
        "input_size": prep.input_size,
        "resize_size": prep.resize_size,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "preprocessing": f"resize the short side to {prep.resize_size} px ({prep.interpolation}), "
                         f"center-crop {prep.input_size} px",
        "backbone": checkpoint.backbone,
        "strategy": checkpoint.strategy,
        "epoch": checkpoint.epoch,
        "tta": checkpoint.tta,
        "onnx_opset": ONNX_OPSET,
    }
