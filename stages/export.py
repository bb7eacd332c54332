"""Stage `export`: the best model as TorchScript and ONNX, for serving without this project.

Writes models/export/ with
- model.ts:    TorchScript (torch.jit.load, no model code needed),
- model.onnx:  ONNX (ONNX Runtime, TensorRT, OpenVINO, ...), batch size dynamic,
- model.json:  what a caller needs: class names in output order, input size, resize size,
               normalisation mean and std, interpolation, and the input and output names.
Both networks take a float32 NCHW batch scaled to 0..1 and normalised with the sidecar's mean and
std, and return class probabilities (softmax included), so their outputs can be compared directly.

Each file is the backbone's export (images -> features) joined with the head's (features ->
probabilities). When the model's backbone is still exactly the pretrained one (strategy frozen, or
a finetune run whose best epoch was a head epoch), the backbone's export is the one the
export_backbone stage made once for these weights: an experiment that changes only the head
exports in 2-3 s instead of about 8, without building or tracing the network. Any other backbone is
exported here.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx.compose
import torch
from torch import nn

from stages.cli import run_stage
from stages.files import atomic_dir, write_json_atomic
from stages.models import (Classifier, Preprocessing, classifier_from_checkpoint, head_from_checkpoint, load_checkpoint,
                           read_pretrained_and_sha256)
from stages.paths import BACKBONE_EXPORT_DIR, EXPORT_DIR, MODEL, PRETRAINED

log = logging.getLogger("export")

INPUT_NAME, FEATURES_NAME, OUTPUT_NAME = "image", "features", "probabilities"
ONNX_OPSET = 17
BACKBONE_TS, BACKBONE_ONNX, BACKBONE_JSON = "backbone.ts", "backbone.onnx", "backbone.json"


def with_softmax(model: nn.Module) -> nn.Module:
    """What both exported files compute: the model's class scores turned into probabilities."""
    return nn.Sequential(model, nn.Softmax(dim=1)).eval()


def probability_model(checkpoint: dict) -> nn.Module:
    """The checkpoint's network in PyTorch, computing what the exported files compute."""
    return with_softmax(classifier_from_checkpoint(checkpoint))


@contextmanager
def quiet_exporters():
    # torch marks TorchScript and the tracing ONNX exporter deprecated, in favour of
    # torch.export; the files they write load in every runtime people serve with today.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def export_onnx(module: nn.Module, example: torch.Tensor, target, input_name: str, output_name: str) -> None:
    torch.onnx.export(module, (example,), target, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


def export_backbone(backbone: nn.Module, input_size: int, folder: Path) -> None:
    """backbone.ts and backbone.onnx in `folder`: images -> features, batch size dynamic."""
    backbone = backbone.eval().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, input_size, input_size)
    with quiet_exporters():
        # The tests compare the exports with PyTorch, so tracing's own re-run check is not needed.
        torch.jit.trace(backbone, example, check_trace=False).save(str(folder / BACKBONE_TS))
        export_onnx(backbone, example, str(folder / BACKBONE_ONNX), INPUT_NAME, FEATURES_NAME)


def join_with_head(backbone_folder: Path, head: nn.Module, folder: Path) -> None:
    """model.ts and model.onnx in `folder`: the backbone's exports followed by the head and a softmax."""
    head = head.eval()
    width = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
    buffer = io.BytesIO()
    with quiet_exporters():
        backbone = torch.jit.load(str(backbone_folder / BACKBONE_TS), map_location="cpu")
        torch.jit.script(with_softmax(Classifier(backbone, head))).save(str(folder / "model.ts"))
        export_onnx(with_softmax(head), torch.rand(2, width), buffer, FEATURES_NAME, OUTPUT_NAME)
    joined = onnx.compose.merge_models(onnx.load(str(backbone_folder / BACKBONE_ONNX)),
                                       onnx.load_from_string(buffer.getvalue()),
                                       io_map=[(FEATURES_NAME, FEATURES_NAME)])
    onnx.save(joined, str(folder / "model.onnx"))


def pretrained_backbone_export(checkpoint: dict) -> Path | None:
    """The export_backbone stage's folder, if it was made from exactly this model's backbone weights."""
    made_from = BACKBONE_EXPORT_DIR / BACKBONE_JSON
    if not made_from.is_file() or not PRETRAINED.is_file():
        return None
    weights_file, sha256 = read_pretrained_and_sha256(PRETRAINED)
    if json.loads(made_from.read_text())["pretrained_sha256"] != sha256:
        return None
    pretrained = weights_file["state_dict"]
    ours = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    # Compared tensor by tensor (BatchNorm statistics included), not by strategy: only weights
    # that are bit for bit the pretrained ones may reuse its export.
    same = pretrained is not None and ours.keys() == pretrained.keys() and all(
        torch.equal(ours[k], pretrained[k]) for k in ours)
    return BACKBONE_EXPORT_DIR if same else None


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
    with atomic_dir(EXPORT_DIR) as tmp, tempfile.TemporaryDirectory() as scratch:
        backbone_folder = pretrained_backbone_export(checkpoint)
        if backbone_folder is not None:
            log.info("the backbone is the pretrained one: joining its export (%s) with the head", backbone_folder)
            head = head_from_checkpoint(checkpoint)
        else:
            model = classifier_from_checkpoint(checkpoint)
            backbone_folder, head = Path(scratch), model.head
            export_backbone(model.backbone, prep.input_size, backbone_folder)
        join_with_head(backbone_folder, head, tmp)
        write_json_atomic(tmp / "model.json", sidecar(checkpoint, prep))
    log.info("%s (epoch %d) exported to %s: model.ts, model.onnx, model.json",
             checkpoint["backbone"], checkpoint["epoch"], EXPORT_DIR)


if __name__ == "__main__":
    run_stage(main)
