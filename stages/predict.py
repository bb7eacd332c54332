"""Classify new images with a trained model: the command, not a pipeline stage.

    python -m stages.predict PATH... [--out predictions.csv|-] [--top-k K] [--model models/model.safetensors]
    python -m stages.predict PATH... --engine onnx [--export models/export] [--int8]
    dvc-transfer-predict PATH...          # the same, installed as a console script

PATHs are image files or folders (searched recursively for .jpg .jpeg .png .gif .bmp .webp).
Images are decoded and preprocessed as the checkpoint says (its backbone's own size and
normalisation) in batches on the best device, scored as evaluate scores them (lib/inference.py,
temperature-scaled). `--min-confidence P` answers `unknown` for an image whose top class is
less probable than P, and counts them.
The CSV has one row per file: path, predicted class, its probability, the top-k classes with
their probabilities and an error column: a file that cannot be read is listed with the reason
and does not stop the run. `--out -` writes to standard output. Exit status 0 when every file
was classified, 1 when any failed. It ends with the images per second.

`--engine onnx` scores with the exported folder instead (models/export/, the export stage's:
ONNX Runtime, fp32, or INT8 with `--int8` where it was shipped), through the same code as the
folder's own predict.py (lib/serve.py): what a deployment without torch will answer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from stages.lib.calibration import calibrate
from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import UserError, run_stage
from stages.lib.data import PathDataset, collate_readable, decode_size, eval_transform
from stages.lib.inference import classify
from stages.lib.paths import EXPORT_DIR, MODEL
from stages.lib.runtime import pick_device
from stages.lib.serve import (
    UNKNOWN,
    Model,
    check_destination,
    checked,
    images_to_classify,
    prediction_arguments,
    prediction_rows,
    write_output,
)

log = logging.getLogger("predict")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="dvc-transfer-predict", description="Classify images with a trained model.")
    prediction_arguments(parser)
    parser.add_argument("--model", type=Path, default=MODEL, help="checkpoint (default: %(default)s)")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                        help="torch: the checkpoint; onnx: the exported folder, as a deployment runs it "
                             "(default: %(default)s)")
    parser.add_argument("--export", type=Path, default=EXPORT_DIR,
                        help="--engine onnx: the exported folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default: %(default)s)")
    parser.add_argument("--tta", choices=["none", "hflip"], default=None,
                        help="average with the mirror image (default: as the model was selected, its model.tta)")
    return checked(parser, argv)


def torch_probabilities(model_path: Path, paths: list[Path], batch_size: int, workers: int, tta: str | None):
    checkpoint = read_checkpoint(model_path)
    device = pick_device()
    model = checkpoint.classifier().to(device, memory_format=torch.channels_last)
    prep = checkpoint.preprocessing
    loader = DataLoader(PathDataset(paths, eval_transform(prep), decode_size(prep)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_readable, pin_memory=device.type == "cuda")
    probs, errors = classify(model, loader, device, tta or checkpoint.tta)
    probs = [None if p is None else calibrate(p[None], checkpoint.temperature)[0] for p in probs]
    return probs, errors, checkpoint.classes


def onnx_probabilities(folder: Path, paths: list[Path], batch_size: int, int8: bool):
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder}: no exported model there; run `dvc repro export`, or give --export")
    try:
        model = Model(folder, int8)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    probs, errors = model.classify(paths, batch_size)
    return probs, errors, model.classes


def main(argv: list[str] | None = None) -> int:
    """Classify and write the CSV; returns the exit status (1 if any file failed)."""
    args = parse_args(argv)
    try:
        paths = images_to_classify(args.paths)
        check_destination(args.out)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.int8 and args.engine != "onnx":
        raise UserError("--int8: the INT8 model is the exported folder's; add --engine onnx")
    started = time.perf_counter()
    if args.engine == "onnx":
        if args.tta:
            raise UserError("--tta: the exported model scores as it was selected (model.json's tta); leave --tta out")
        probs, errors, classes = onnx_probabilities(args.export, paths, args.batch_size, args.int8)
    else:
        probs, errors, classes = torch_probabilities(args.model, paths, args.batch_size, args.workers, args.tta)
    seconds = time.perf_counter() - started
    columns, rows = prediction_rows(paths, probs, errors, classes, args.top_k, args.min_confidence)
    table = pd.DataFrame(rows, columns=columns)
    try:
        where = write_output(args.out, table.to_csv(index=False, lineterminator="\n"))
    except ValueError as error:
        raise UserError(str(error)) from None
    failed = sum(bool(e) for e in errors)
    unsure = f", {int((table['predicted'] == UNKNOWN).sum())} {UNKNOWN} (below --min-confidence " \
             f"{args.min_confidence:g})" if args.min_confidence else ""
    log.info("%d images classified%s, %d unreadable, in %.1f s (%.1f images/s); wrote %s", len(paths) - failed,
             unsure, failed, seconds, len(paths) / seconds, where)
    return 1 if failed else 0


def cli() -> None:
    """The console script: `dvc-transfer-predict PATH...`."""
    sys.exit(run_stage(main))


if __name__ == "__main__":
    cli()
