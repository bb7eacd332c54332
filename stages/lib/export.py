"""Models as ONNX files, for serving without this project.

Each exported file is a backbone part (images -> features) joined with a head part (features ->
probabilities, softmax included). The backbone part of the pretrained weights is exported once
(the export_backbone stage) and reused for every model whose backbone is still exactly those
weights; any other backbone is exported on the spot, by torch. The head part is written here
from the head's arrays (`head_graph`), so exporting a model on the pretrained backbone, which is
every head-only experiment, needs no torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
from onnx import TensorProto, helper, numpy_helper

from stages.lib.checkpoint import Checkpoint
from stages.lib.head import Layers

INPUT_NAME, FEATURES_NAME, OUTPUT_NAME = "image", "features", "probabilities"
HEAD_PREFIX = "head_"
ONNX_OPSET = 17
BACKBONE_ONNX, BACKBONE_JSON = "backbone.onnx", "backbone.json"
MODEL_ONNX, MODEL_JSON = "model.onnx", "model.json"


def export_backbone(backbone, input_size: int, folder: Path) -> None:
    """backbone.onnx in `folder`: a PyTorch backbone's images -> features, batch size dynamic."""
    import torch

    backbone = backbone.eval().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, input_size, input_size)
    # torch marks the tracing ONNX exporter deprecated, in favour of torch.export; the files it
    # writes load in every runtime people serve with today.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone, (example,), str(folder / BACKBONE_ONNX), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[FEATURES_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}})


def head_graph(layers: Layers, temperature: float) -> onnx.ModelProto:
    """features -> probabilities: the head's Linear layers (a Relu between two), the class scores
    divided by the temperature, then a softmax; what lib/head.py computes, batch size dynamic.
    Its nodes' names start with HEAD_PREFIX (INT8 keeps them in float)."""
    nodes, weights, current = [], [], FEATURES_NAME
    for i, (weight, bias) in enumerate(layers):
        if i:
            nodes.append(helper.make_node("Relu", [current], [f"head_relu_{i}"], name=f"head_relu_{i}"))
            current = f"head_relu_{i}"
        weights += [numpy_helper.from_array(weight.astype(np.float32), f"head_weight_{i}"),
                    numpy_helper.from_array(bias.astype(np.float32), f"head_bias_{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"head_weight_{i}", f"head_bias_{i}"], [f"head_scores_{i}"],
                                      name=f"head_gemm_{i}", transB=1))
        current = f"head_scores_{i}"
    weights.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), "temperature"))
    nodes += [helper.make_node("Div", [current, "temperature"], ["head_scaled"], name="head_temperature"),
              helper.make_node("Softmax", ["head_scaled"], [OUTPUT_NAME], name="head_softmax", axis=1)]
    width, classes = layers[0][0].shape[1], layers[-1][0].shape[0]
    inputs = [helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["batch", width])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])]
    graph = helper.make_graph(nodes, "head", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])


def join_with_head(backbone_onnx: Path, layers: Layers, temperature: float, target: Path) -> None:
    """`target`: the backbone's export followed by the head, the temperature and a softmax."""
    backbone = onnx.load(str(backbone_onnx))
    head = head_graph(layers, temperature)
    head.ir_version = backbone.ir_version  # merging asks for one IR version; the exporter's is the older
    joined = onnx.compose.merge_models(backbone, head, io_map=[(FEATURES_NAME, FEATURES_NAME)])
    # merge_models lists the default domain once per part: one entry per domain, as the spec (and
    # ONNX Runtime's quantiser) expects
    opsets: dict[str, int] = {}
    for opset in joined.opset_import:
        opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    del joined.opset_import[:]
    joined.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    onnx.save(joined, str(target))


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
