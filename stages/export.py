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
- model.int8.onnx (export.int8): the backbone quantised to INT8 (lib/quantize.py) joined with the
               head in float, shipped only if its test accuracy is within export.int8_tolerance of
               fp32's; model.json's `int8` says what was measured and why it shipped or not.
And metrics/export/summary.json: fp32 and INT8 test accuracy, macro-F1 and agreement (the head on
each exported backbone's outputs, ONNX Runtime, for the test images) and the model's md5; the
headline metrics/export.json, whether INT8 shipped and that md5's start: the export runs on
request (release/dvc.yaml), so its figures name the model they describe. Those outputs are kept per image
in data/cache/export/ (a `persist: true` output; lib/feature_cache.py): a new head on the same
backbone, or a few new images, costs the backbones' passes over what is new only. INT8 is
calibrated on the training images with the smallest content hashes, a sample that adding a few
images seldom changes, and so seldom the INT8 backbone. How fast each runs is the latency stage's.
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
from stages.lib.export import (
    BACKBONE_ONNX,
    MODEL_JSON,
    MODEL_ONNX,
    export_backbone,
    join_with_head,
    reusable_backbone_export,
    sidecar,
)
from stages.lib.export_folder import write_predictor
from stages.lib.feature_cache import entry_paths, filled, onnx_setting_key, prune, short_hash
from stages.lib.files import atomic_dir, atomic_path, file_sha256, short_md5, write_json_atomic
from stages.lib.head import feature_probabilities
from stages.lib.images import load_image
from stages.lib.index_table import read_split
from stages.lib.metrics import macro_f1
from stages.lib.params import ExportParams, load_params
from stages.lib.paths import (
    BACKBONE_EXPORT_DIR,
    EXPORT_CACHE,
    EXPORT_DIR,
    EXPORT_METRICS,
    EXPORT_SUMMARY,
    MODEL,
    RAW_DIR,
)
from stages.lib.quantize import has_vnni, int8_verdict, quantize_int8
from stages.lib.serve import INT8_ONNX, cpu_session, prepare

log = logging.getLogger("export")
SCORING_BATCH = 16  # test images per ONNX Runtime call


def backbone_features(onnx_file: Path, setting: str, rows, side: dict,
                      views: list[str]) -> tuple[np.ndarray, set[Path]]:
    """The ONNX backbone's outputs on `rows`' images, [images, views, width]: from the per-image
    cache (data/cache/export/<setting>, lib/feature_cache.py) where it has them, the others
    computed and added to it. Also the cache files used."""
    cache = EXPORT_CACHE / setting
    paths, sha256s = rows["path"].tolist(), rows["sha256"].tolist()

    def through_backbone(missing: list[int]) -> np.ndarray:
        session = cpu_session(onnx_file, cpu_threads())
        name = session.get_inputs()[0].name
        computed = []
        for start in range(0, len(missing), SCORING_BATCH):
            images = np.stack([prepared(RAW_DIR / paths[i], side) for i in missing[start:start + SCORING_BATCH]])
            # ONNX Runtime's CPU kernels give an image the same bits in any batch, alone included
            # (tests/test_export.py checks a run from the cache against one from an empty cache)
            computed.append(np.stack([session.run(None, {name: np.ascontiguousarray(
                images[..., ::-1] if view == "hflip" else images)})[0] for view in views], axis=1))
        return np.concatenate(computed)

    vectors, missing = filled(cache, views, sha256s, through_backbone)
    log.info("%s: %d test images x %d views (%d through it, %d from %s)", onnx_file.name, len(rows), len(views),
             len(missing), len(rows) - len(missing), EXPORT_CACHE)
    return vectors, entry_paths(cache, views, sha256s)


def prepared(path: Path, side: dict) -> np.ndarray:
    try:
        return prepare(load_image(path, side["resize_size"]), side)
    except Exception as error:  # noqa: BLE001 - any unreadable file means the same here
        raise UserError(f"{path}: cannot be read any more ({type(error).__name__}); run `dvc repro index` again") \
            from None


def test_scores(features: np.ndarray, views: list[str], layers, tta: str, labels: np.ndarray,
                classes: int) -> tuple[np.ndarray, float, float]:
    """Predicted classes, accuracy and macro-F1 of the head on an exported backbone's test
    features: what the exported model (that backbone joined with this head) answers."""
    predicted = feature_probabilities(layers, {"features": features, "views": views}, tta).argmax(1)
    return predicted, float((predicted == labels).mean()), macro_f1(labels, predicted, classes)


def calibration_rows(train, count: int):
    """The training images with the smallest content hashes: a sample that adding a few images
    seldom changes (so neither does the INT8 model, nor its cached test features)."""
    return train.sort_values("sha256", kind="stable").head(count)


def quantised_backbone(backbone: Path, setting: str, calibration_rows, side: dict) -> Path:
    """The backbone (its file, and its onnx_setting_key) quantised to INT8 on these calibration
    images, from data/cache/export/ when this backbone was quantised on exactly these images before
    (the quantiser is deterministic: a new head on the same backbone and data needs no calibration
    pass)."""
    key = short_hash({"backbone": setting, "reduce_range": not has_vnni(),
                      "calibration": calibration_rows["sha256"].tolist()})
    target = EXPORT_CACHE / f"backbone.int8-{key}.onnx"
    if target.is_file():
        log.info("INT8 backbone: quantised on these %d calibration images before (%s)", len(calibration_rows), target)
        return target
    calibration = np.stack([prepared(RAW_DIR / path, side) for path in calibration_rows["path"]])
    with atomic_path(target) as temporary:
        quantize_int8(backbone, temporary, side["input"]["name"], calibration)
    return target


def ship_int8_or_not(folder: Path, backbone: Path, checkpoint, side: dict,
                     settings: ExportParams) -> tuple[dict, dict, set[Path]]:
    """model.int8.onnx in `folder` (the backbone quantised, joined with the head in float) if it
    keeps fp32's test accuracy; the metrics, what the sidecar records, and the cache files used."""
    train, test = read_split("train"), read_split("test")
    chosen = calibration_rows(train, settings.calibration_images)
    fp32_setting = onnx_setting_key(backbone, side)
    int8_backbone = quantised_backbone(backbone, fp32_setting, chosen, side)
    views = ["plain", "hflip"] if checkpoint.tta == "hflip" else ["plain"]
    labels, classes, layers = test["label"].to_numpy(), len(side["classes"]), checkpoint.head_layers()
    fp32_features, fp32_files = backbone_features(backbone, fp32_setting, test, side, views)
    int8_features, int8_files = backbone_features(int8_backbone, onnx_setting_key(int8_backbone, side), test, side,
                                                  views)
    fp32, fp32_accuracy, fp32_f1 = test_scores(fp32_features, views, layers, checkpoint.tta, labels, classes)
    int8, int8_accuracy, int8_f1 = test_scores(int8_features, views, layers, checkpoint.tta, labels, classes)
    shipped, why = int8_verdict(fp32_accuracy, int8_accuracy, settings.int8_tolerance)
    if shipped:
        join_with_head(int8_backbone, layers, checkpoint.temperature, folder / INT8_ONNX)
    log.info("%s; INT8 agrees with fp32 on %.4f of the test images", why, float((int8 == fp32).mean()))
    metrics = {"fp32_test_accuracy": fp32_accuracy, "fp32_test_macro_f1": fp32_f1,
               "int8_test_accuracy": int8_accuracy, "int8_test_macro_f1": int8_f1,
               "int8_agreement": float((int8 == fp32).mean()), "int8_shipped": int(shipped)}
    return metrics, {"shipped": shipped, "why": why, "calibration_images": len(chosen),
                     **{key: value for key, value in metrics.items() if key != "int8_shipped"}}, \
        fp32_files | int8_files | {int8_backbone}


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
        backbone = backbone_folder / BACKBONE_ONNX
        join_with_head(backbone, checkpoint.head_layers(), checkpoint.temperature, tmp / MODEL_ONNX)
        side = sidecar(checkpoint)
        write_json_atomic(tmp / MODEL_JSON, side)
        metrics, used = {}, set()
        if settings.int8:
            metrics, side["int8"], used = ship_int8_or_not(tmp, backbone, checkpoint, side, settings)
            write_json_atomic(tmp / MODEL_JSON, side)
        write_predictor(tmp)
    files, size = prune(EXPORT_CACHE, {path.relative_to(EXPORT_CACHE).parts[0] for path in used}, used)
    log.info("%s: %d files, %.1f MB (only these backbones' and test images')", EXPORT_CACHE, files, size / 1e6)
    # On request, so its headline names the model it exported (dvc.lock's md5 of models/model.safetensors):
    # no view shows it as measured on an experiment's model when it was not.
    write_json_atomic(EXPORT_SUMMARY, {**metrics, "model_md5": file_sha256(MODEL, "md5")})
    write_json_atomic(EXPORT_METRICS, {"int8": metrics.get("int8_shipped", 0), "md5": short_md5(MODEL)})
    log.info("%s (epoch %d) exported to %s: model.onnx%s, model.json, predict.py (python predict.py PATH...)",
             checkpoint.backbone, checkpoint.epoch, EXPORT_DIR,
             ", model.int8.onnx" if metrics.get("int8_shipped") else "")


if __name__ == "__main__":
    run_stage(main)
