"""Classify images with an exported model folder, with only onnxruntime, numpy and pillow.

The export stage copies this file into models/export/ as predict.py, beside images.py (the
pipeline's own decoding: EXIF orientation, 16-bit and transparent images) and the model:

    pip install -r requirements.txt
    python predict.py PATH... [--out predictions.csv|-] [--top-k K] [--min-confidence P] [--int8]

The CSV is the project's predict command's: path, predicted class, its probability, the top-k
classes with their probabilities and an error column (an unreadable file is listed with the
reason and does not stop the run). Exit status 0 when every file was classified, 1 when any
failed, 2 for bad arguments. In the project, `python -m stages.predict --engine onnx` runs this
same code on models/export/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

try:  # in the project
    from stages.lib.images import IMAGE_EXTENSIONS, find_images, load_image
except ModuleNotFoundError:  # in an exported folder, beside images.py
    from images import IMAGE_EXTENSIONS, find_images, load_image

MODEL_ONNX, INT8_ONNX, MODEL_JSON = "model.onnx", "model.int8.onnx", "model.json"
UNKNOWN = "unknown"  # the answer below --min-confidence
INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def prepare(image: Image.Image, side: dict) -> np.ndarray:
    """A decoded image as the model takes it (3 x size x size float32): what torchvision's Resize
    (short side), CenterCrop, ToDtype(scale) and Normalize do to a PIL image in the pipeline."""
    width, height = image.size
    short, long = sorted((width, height))
    size = side["resize_size"]
    other = int(size * long / short)
    new = (size, other) if width <= height else (other, size)
    image = image.resize(new, INTERPOLATION[side["interpolation"]])
    crop = side["input_size"]
    left, top = int(round((new[0] - crop) / 2.0)), int(round((new[1] - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32).transpose(2, 0, 1)
    mean, std = (np.asarray(side[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    return (pixels * np.float32(1 / 255) - mean) / std


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def cpu_session(onnx_file: Path, threads: int = 0):
    """An ONNX Runtime session on the CPU with `threads` threads (0: its choice)."""
    import onnxruntime  # here: the project's predict command imports this module for its table alone

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


class Model:
    """An exported folder's model: images in, temperature-scaled class probabilities out."""

    def __init__(self, folder: Path, int8: bool = False, threads: int = 0):
        self.folder = Path(folder)
        self.side = json.loads((self.folder / MODEL_JSON).read_text(encoding="utf-8"))
        name = INT8_ONNX if int8 else MODEL_ONNX
        if not (self.folder / name).is_file():
            raise FileNotFoundError(f"{self.folder / name}: not in the export" + (
                " (INT8 ships only with export.int8 on, and only if it keeps the fp32 model's test accuracy: "
                "model.json's int8 says what was measured)"
                if int8 else ""))
        self.session = cpu_session(self.folder / name, threads)
        self.classes = self.side["classes"]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of prepared images, averaged with the mirror images when
        the model was selected so (tta hflip) as the pipeline averages them: before the temperature."""
        run = lambda images: self.session.run([self.side["output"]["name"]],  # noqa: E731
                                              {self.side["input"]["name"]: np.ascontiguousarray(images)})[0]
        probs = run(batch)
        if self.side.get("tta") != "hflip":
            return probs
        temperature = self.side["temperature"]
        # The graph divides the scores by the temperature; T log p recovers them up to a constant.
        plain = [softmax(temperature * np.log(np.maximum(p, 1e-30))) for p in (probs, run(batch[..., ::-1]))]
        return softmax(np.log(np.maximum((plain[0] + plain[1]) / 2, 1e-12)) / temperature)

    def classify(self, paths: list[Path], batch_size: int = 16) -> tuple[list, list[str]]:
        """Probabilities per readable file (None for the others) and each file's error ("" if none)."""
        (probs,), errors = classify_with([self], paths, batch_size)
        return probs, errors


def classify_with(models: list[Model], paths: list[Path], batch_size: int = 16) -> tuple[list[list], list[str]]:
    """Each model's probabilities per readable file (None for the others), each image decoded once
    for all of them (they share one preprocessing: one export's fp32 and INT8), and each file's error."""
    side = models[0].side
    probs, errors, batch = [[None] * len(paths) for _ in models], [""] * len(paths), []

    def flush():
        if batch:
            images = np.stack([image for _, image in batch])
            for model, scored in zip(models, probs):
                for (i, _), p in zip(batch, model.probabilities(images)):
                    scored[i] = p
            batch.clear()

    for i, path in enumerate(paths):
        try:
            batch.append((i, prepare(load_image(path, side["resize_size"]), side)))
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported in the CSV
            errors[i] = f"{type(error).__name__}: {error}".splitlines()[0]
        if len(batch) == batch_size:
            flush()
    flush()
    return probs, errors


def prediction_rows(paths: list, probs: list, errors: list[str], classes: list[str], top_k: int,
                    min_confidence: float = 0.0) -> tuple[list[str], list[dict]]:
    """The predict table's columns and rows: per file the predicted class (or `unknown` below
    `min_confidence`) and the top-k, or the reason it could not be read."""
    k = min(top_k, len(classes))
    rows = []
    for path, p, error in zip(paths, probs, errors):
        row = {"path": str(path), "predicted": "", "probability": None}
        if p is not None:
            indices = np.argsort(-p, kind="stable")[:k]
            values = p[indices]
            sure = float(values[0]) >= min_confidence
            row.update(predicted=classes[indices[0]] if sure else UNKNOWN, probability=round(float(values[0]), 6))
            for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
                row[f"top{rank}_class"], row[f"top{rank}_probability"] = classes[index], round(value, 6)
        rows.append({**row, "error": error})
    columns = ["path", "predicted", "probability"]
    columns += [f"top{r}_{what}" for r in range(1, k + 1) for what in ("class", "probability")] + ["error"]
    return columns, rows


def csv_text(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this predictor and the project's predict command share (one CSV, one meaning)."""
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"),
                        help="CSV to write, - for standard output (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: %(default)s)")
    parser.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                        help=f"answer {UNKNOWN!r} when the top class's (temperature-scaled) probability is below P "
                             "(default: %(default)s, always answer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="the INT8 model, where the export shipped one")


def checked(parser: argparse.ArgumentParser, argv: list[str] | None):
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    for name in ("threads", "workers"):  # each predictor has one of them
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name} must be at least 0")
    if not 0 <= args.min_confidence <= 1:
        parser.error("--min-confidence must be a probability, from 0 to 1")
    return args


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="predict.py", description="Classify images with this exported model.")
    prediction_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime's threads (default: 0, its choice)")
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parent,
                        help="the exported folder (default: this file's)")
    return checked(parser, argv)


def images_to_classify(given: list[Path]) -> list[Path]:
    """The image files the given files and folders hold; ValueError naming what is missing or empty."""
    missing = [str(p) for p in given if not p.exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such file or folder; give image files or folders to classify")
    paths = find_images(given)
    if not paths:
        raise ValueError(f"{given[0]}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def check_destination(out: Path) -> None:
    """Raise ValueError (one line, naming `out`) when the CSV cannot be written there, before any
    image is classified; create its missing parent folders. Standard output (`-`), a pipe or a
    device is written in place; a link is followed; a regular file is replaced whole, unless it is
    read-only: chmod -w keeps a file from being overwritten, as it does for the shell's `>`."""
    if str(out) == "-":
        return
    target = Path(os.path.realpath(out))
    if target.is_dir():
        raise ValueError(f"{out}: is a folder; give a file name for the CSV, or - for standard output")
    if target.exists() and not target.is_file():
        return
    if target.exists() and not target.stat().st_mode & 0o222:
        raise ValueError(f"{out}: is read-only; make it writable (chmod u+w) or give another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out}: cannot make its folder {target.parent}/ ({error.strerror or error}); "
                         "give another --out") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write in {target.parent}/ (permission denied); make that folder "
                         "writable, or give another --out")


def write_output(out: Path, text: str) -> str:
    """Write the CSV where check_destination allowed it, as Unix tools do; returns where it went.
    A regular file is written whole or not at all (a temporary file beside it, then one rename),
    so a pipe, a device or standard output is the one thing written in place: renaming over
    /dev/null would replace the system's node."""
    if str(out) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return "standard output"
    check_destination(out)
    target = Path(os.path.realpath(out))
    if target.exists() and not target.is_file():
        with open(target, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        return str(out)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(tmp, target)
    except OSError as error:
        raise ValueError(f"{out}: cannot write it ({error.strerror or error}); give another --out") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = images_to_classify(args.paths)
        check_destination(args.out)
        model = Model(args.model, args.int8, args.threads)
        started = time.perf_counter()
        probs, errors = model.classify(paths, args.batch_size)
        seconds = time.perf_counter() - started
        columns, rows = prediction_rows(paths, probs, errors, model.classes, args.top_k, args.min_confidence)
        where = write_output(args.out, csv_text(columns, rows))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = sum(bool(e) for e in errors)
    unsure = sum(row["predicted"] == UNKNOWN for row in rows)
    print(f"{len(paths) - failed} images classified" + (f", {unsure} {UNKNOWN}" if args.min_confidence else "")
          + f", {failed} unreadable, in {seconds:.1f} s ({len(paths) / seconds:.1f} images/s); wrote {where}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
