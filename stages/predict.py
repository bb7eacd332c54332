"""Class probabilities from a trained model: the helpers train and evaluate share, and the
command that classifies new images.

    python -m stages.predict PATH... [--out predictions.csv] [--top-k K] [--model models/model.pt]
    dvc-transfer-predict PATH...          # the same, installed as a console script

PATHs are image files or folders (searched recursively for .jpg .jpeg .png .gif .bmp .webp).
Images are decoded and preprocessed as the checkpoint says (its backbone's own size and
normalisation) in batches on the best device. The CSV has one row per file: path, predicted
class, its probability, the top-k classes with their probabilities (the recipe's "results to
pandas" table) and an error column: a file that cannot be read is listed with the reason and
does not stop the run. Exit status 0 when every file was classified, 1 when any failed.

The helpers need torch alone, so a stage that scores cached features starts quickly.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.cli import UserError, run_stage


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy of predicted probabilities."""
    loss = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them a CPU emulates bf16 and runs autocast slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(device: torch.device, amp: bool):
    """Mixed precision: on CUDA bf16 where supported, else fp16 (with a GradScaler in training);
    on CPUs with native bf16, bf16; full precision elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if amp and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    format_ = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=format_)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
            channels_last: bool = False, desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels over a loader; with tta=hflip, averaged with the mirror image."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images = to_device(images, device, channels_last)
        with autocast(device, amp):
            probs = model(images).float().softmax(1)
            if tta == "hflip":
                probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
        all_probs.append(probs.cpu())
        all_labels.append(labels)
    return torch.cat(all_probs), torch.cat(all_labels)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
             channels_last: bool = False) -> tuple[float, float]:
    return summarize(*predict(model, loader, device, tta, amp, channels_last, desc="validating"))


@torch.inference_mode()
def head_probabilities(head: nn.Module, split: dict, tta: str) -> torch.Tensor:
    """Class probabilities from cached features: the plain view, averaged with the mirrored one
    for tta=hflip."""
    head.eval()
    probs = head(split["features"][:, split["views"].index("plain")]).softmax(1)
    if tta == "hflip":
        if "hflip" not in split["views"]:
            raise UserError("cached features lack the mirrored view that evaluate.tta=hflip needs; run dvc repro")
        probs = (probs + head(split["features"][:, split["views"].index("hflip")]).softmax(1)) / 2
    return probs


# --- the predict command ---------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for images, each path once, in order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return list(dict.fromkeys(found))


class PathDataset(torch.utils.data.Dataset):
    """(image tensor or None, error message) per path: a bad file is reported, not raised."""

    def __init__(self, paths: list[Path], transform, decode_size: int):
        self.paths, self.transform, self.decode_size = paths, transform, decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from stages.data import load_image

        try:
            return self.transform(load_image(self.paths[i], self.decode_size)), ""
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported in the CSV
            return None, f"{type(error).__name__}: {error}".splitlines()[0]


def collate_readable(items):
    """Stack the images that decoded; keep every item's error (empty when fine)."""
    images = [image for image, _ in items if image is not None]
    return (torch.stack(images) if images else None), [error for _, error in items]


@torch.inference_mode()
def classify(model: nn.Module, loader: DataLoader, device: torch.device, tta: str):
    """Probabilities per readable file (None for the others) and each file's error."""
    model.eval()
    probs, errors = [], []
    for images, batch_errors in tqdm(loader, desc="predicting", unit="batch", disable=None):
        errors += batch_errors
        batch_probs = iter(predict_batch(model, images, device, tta) if images is not None else [])
        probs += [None if error else next(batch_probs) for error in batch_errors]
    return probs, errors


def predict_batch(model: nn.Module, images: torch.Tensor, device: torch.device, tta: str) -> torch.Tensor:
    images = to_device(images, device, channels_last=True)
    probs = model(images).float().softmax(1)
    if tta == "hflip":
        probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
    return probs.cpu()


def predictions_frame(paths: list[Path], probs, errors: list[str], classes: list[str], top_k: int):
    import pandas as pd

    k = min(top_k, len(classes))
    rows = []
    for path, p, error in zip(paths, probs, errors):
        row = {"path": str(path), "predicted": "", "probability": None}
        if p is not None:
            values, indices = p.topk(k)
            row.update(predicted=classes[indices[0]], probability=round(values[0].item(), 6))
            for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
                row[f"top{rank}_class"], row[f"top{rank}_probability"] = classes[index], round(value, 6)
        rows.append({**row, "error": error})
    columns = ["path", "predicted", "probability"]
    columns += [f"top{r}_{what}" for r in range(1, k + 1) for what in ("class", "probability")] + ["error"]
    return pd.DataFrame(rows, columns=columns)


def parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(prog="dvc-transfer-predict", description="Classify images with a trained model.")
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="checkpoint (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default: %(default)s)")
    parser.add_argument("--tta", choices=["none", "hflip"], default="none", help="average with the mirror image")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--top-k and --batch-size must be at least 1, --workers at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Classify, write the CSV atomically; returns the exit status (1 if any file failed)."""
    import logging

    from stages.data import decode_size, eval_transform
    from stages.files import atomic_path
    from stages.models import Preprocessing, classifier_from_checkpoint, load_checkpoint, pick_device

    args = parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]}: no such file or folder; give image files or folders to classify")
    paths = find_images(args.paths)
    if not paths:
        raise UserError(f"{args.paths[0]}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    checkpoint = load_checkpoint(args.model)
    device = pick_device()
    model = classifier_from_checkpoint(checkpoint).to(device, memory_format=torch.channels_last)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    dataset = PathDataset(paths, eval_transform(prep), decode_size(prep))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_readable,
                        pin_memory=device.type == "cuda")
    probs, errors = classify(model, loader, device, args.tta)
    table = predictions_frame(paths, probs, errors, checkpoint["classes"], args.top_k)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    failed = sum(bool(e) for e in errors)
    logging.getLogger("predict").info("%d images classified, %d unreadable; wrote %s", len(paths) - failed, failed,
                                      args.out)
    return 1 if failed else 0


def cli() -> None:
    """The console script: `dvc-transfer-predict PATH...`."""
    import sys

    sys.exit(run_stage(main))


if __name__ == "__main__":
    cli()
