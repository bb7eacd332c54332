"""Stage `export`: the best model as ONNX, for serving without this project.

Writes models/export/ with
- model.onnx:  ONNX (ONNX Runtime, TensorRT, OpenVINO, ...), batch size dynamic: a float32 NCHW
               batch scaled to 0..1 and normalised with the sidecar's mean and std in, class
               probabilities (temperature and softmax included) out;
- model.json:  what a caller needs: class names in output order, input size, resize size,
               normalisation mean and std, interpolation, and the input and output names;
- predict.py, images.py, requirements.txt, README.md: a predictor that needs only onnxruntime,
               numpy and pillow (lib/serve.py and the pipeline's own decoding, lib/images.py),
               so the folder alone classifies images: `python predict.py PATH...`;
- model.int8.onnx (export.int8): the model quantised to INT8 (lib/quantize.py), shipped only if
               its test accuracy is within export.int8_tolerance of fp32's; model.json's `int8`
               says what was measured and why it shipped or not.
And metrics/export.json: fp32 and INT8 test accuracy (ONNX Runtime, through the folder's own
predictor), macro-F1 and agreement. How fast each runs is the latency stage's.
No TorchScript: torch has deprecated it, ONNX runs in every serving runtime, and a PyTorch user
has models/model.safetensors (docs/model.md).

When the model's backbone is still exactly the pretrained one (strategy frozen, or a finetune run
whose best epoch was a head epoch), the backbone part is the one the export_backbone stage made
once for these weights, and the head part is written from the checkpoint's arrays, without
tracing the network again. Any other backbone is exported here, by torch (lib/export.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import UserError, run_stage
from stages.lib.cores import cpu_threads
from stages.lib.export import MODEL_JSON, export_backbone, join_with_head, reusable_backbone_export, sidecar
from stages.lib.export_folder import write_predictor
from stages.lib.files import atomic_dir, write_json_atomic
from stages.lib.images import load_image
from stages.lib.index_table import read_split
from stages.lib.metrics import macro_f1
from stages.lib.params import ExportParams, load_params
from stages.lib.paths import BACKBONE_EXPORT_DIR, EXPORT_DIR, EXPORT_METRICS, MODEL, RAW_DIR
from stages.lib.quantize import int8_verdict, quantize_int8
from stages.lib.serve import INT8_ONNX, MODEL_ONNX, Model, classify_with, prepare

log = logging.getLogger("export")


def test_scores(models: list[Model], test) -> list[tuple[np.ndarray, float, float]]:
    """Each model's predicted classes on the test split, accuracy and macro-F1, as the folder's
    predictor gives them (each image decoded once for all the models)."""
    probs, errors = classify_with(models, [RAW_DIR / path for path in test["path"]])
    failed = [path for path, error in zip(test["path"], errors) if error]
    if failed:
        raise UserError(f"{RAW_DIR / failed[0]}: cannot be read any more; run `dvc repro index` again")
    labels = test["label"].to_numpy()
    scores = []
    for model, scored in zip(models, probs):
        predicted = np.stack(scored).argmax(1)
        scores.append((predicted, float((predicted == labels).mean()), macro_f1(labels, predicted, len(model.classes))))
    return scores


def ship_int8_or_not(folder: Path, side: dict, settings: ExportParams) -> tuple[dict, dict]:
    """model.int8.onnx in `folder` if it keeps fp32's test accuracy (else removed); the metrics,
    and what the sidecar records."""
    train, test = read_split("train"), read_split("test")
    chosen = train.sample(n=min(settings.calibration_images, len(train)), random_state=0)
    calibration = np.stack([prepare(load_image(RAW_DIR / path, side["resize_size"]), side) for path in chosen["path"]])
    quantize_int8(folder / MODEL_ONNX, folder / INT8_ONNX, side["input"]["name"], calibration)
    (fp32, fp32_accuracy, fp32_f1), (int8, int8_accuracy, int8_f1) = test_scores(
        [Model(folder, threads=cpu_threads()), Model(folder, int8=True, threads=cpu_threads())], test)
    shipped, why = int8_verdict(fp32_accuracy, int8_accuracy, settings.int8_tolerance)
    if not shipped:
        (folder / INT8_ONNX).unlink()
    log.info("%s; INT8 agrees with fp32 on %.4f of the test images", why, float((int8 == fp32).mean()))
    metrics = {"fp32_test_accuracy": fp32_accuracy, "fp32_test_macro_f1": fp32_f1,
               "int8_test_accuracy": int8_accuracy, "int8_test_macro_f1": int8_f1,
               "int8_agreement": float((int8 == fp32).mean()), "int8_shipped": int(shipped)}
    return metrics, {"shipped": shipped, "why": why, "calibration_images": len(chosen),
                     **{key: value for key, value in metrics.items() if key != "int8_shipped"}}


def main() -> None:
    settings = load_params().export
    checkpoint = read_checkpoint(MODEL)
    with atomic_dir(EXPORT_DIR) as tmp, tempfile.TemporaryDirectory() as scratch:
        if reusable_backbone_export(BACKBONE_EXPORT_DIR, checkpoint):
            log.info("the backbone is the pretrained one: joining its export (%s) with the head", BACKBONE_EXPORT_DIR)
            backbone_folder = BACKBONE_EXPORT_DIR
        else:
            backbone_folder = Path(scratch)
            export_backbone(checkpoint.classifier().backbone, checkpoint.preprocessing.input_size, backbone_folder)
        join_with_head(backbone_folder, checkpoint.head_layers(), checkpoint.temperature, tmp)
        side = sidecar(checkpoint)
        write_json_atomic(tmp / MODEL_JSON, side)
        metrics = {}
        if settings.int8:
            metrics, side["int8"] = ship_int8_or_not(tmp, side, settings)
            write_json_atomic(tmp / MODEL_JSON, side)
        write_predictor(tmp)
    write_json_atomic(EXPORT_METRICS, metrics)
    log.info("%s (epoch %d) exported to %s: model.onnx%s, model.json, predict.py (python predict.py PATH...)",
             checkpoint.backbone, checkpoint.epoch, EXPORT_DIR,
             ", model.int8.onnx" if metrics.get("int8_shipped") else "")


if __name__ == "__main__":
    run_stage(main)
