"""Stage `heatmaps`: where the model looks, in the test images evaluate shows.

For the same images, in the same order, as evaluate's grid of test predictions and its gallery of
misclassified ones, a heat map of the evidence for the class evaluate predicted, over the image
as the model saw it: the checkpoint's own preprocessing (its evaluation size, resize and center
crop), full precision, the model's tta (lib/heatmaps.py: Grad-CAM on the backbone's last spatial
map, or input-gradient saliency for a backbone that has none). A stage of its own: the maps need
torch and backward passes, while evaluate scores a frozen model on cached features without torch.

Writes metrics/eval/predictions_heatmaps.png and metrics/eval/misclassified_heatmaps.png.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import UserError, run_stage
from stages.lib.data import ImageDataset, decode_size, eval_transform
from stages.lib.files import read_csv
from stages.lib.heatmaps import GRAD_CAM, SALIENCY, class_heatmaps, last_feature_map
from stages.lib.metrics import shown_predictions
from stages.lib.params import load_params
from stages.lib.paths import (
    MISCLASSIFIED_HEATMAPS_PNG,
    MODEL,
    PREDICTIONS_CSV,
    PREDICTIONS_HEATMAPS_PNG,
)
from stages.lib.plots import overlay_heatmap, prediction_titles, save_image_grid
from stages.lib.preprocessing import Preprocessing
from stages.lib.runtime import pick_device

log = logging.getLogger("heatmaps")
BATCH = 8  # images per backward pass: its activations are kept for the gradient


def read_predictions(classes: list[str]) -> pd.DataFrame:
    if not PREDICTIONS_CSV.is_file():
        raise UserError(f"{PREDICTIONS_CSV}: not found; run the evaluate stage first (dvc repro)")
    table = read_csv(PREDICTIONS_CSV)
    unknown = sorted(set(table["predicted"]) - set(classes))
    if unknown:
        raise UserError(f"{PREDICTIONS_CSV}: predicts {unknown[0]!r}, which {MODEL} does not know; "
                        "rerun evaluate (dvc repro)")
    return table


def model_inputs(rows: pd.DataFrame, prep: Preprocessing, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' images as the model scores them (evaluate's dataset and transform), and the index of
    each row's predicted class."""
    targets = [classes.index(name) for name in rows["predicted"]]
    dataset = ImageDataset(rows.assign(label=targets), eval_transform(prep), decode_size(prep))
    images = [dataset[i][0] for i in range(len(dataset))]
    batch = torch.stack(images) if images else torch.empty(0, 3, prep.input_size, prep.input_size)
    return batch, torch.tensor(targets, dtype=torch.long)


def seen_pixels(images: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """The model's inputs back in 0..1 colours (N, H, W, 3): the crop it saw, undone normalisation."""
    mean, std = torch.tensor(prep.mean)[:, None, None], torch.tensor(prep.std)[:, None, None]
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlaid_heatmaps(model, layer: str | None, rows: pd.DataFrame, prep: Preprocessing, classes: list[str],
                      tta: str, device: torch.device) -> list[np.ndarray]:
    images, targets = model_inputs(rows, prep, classes)
    pictures = []
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        maps = class_heatmaps(model, layer, batch.to(device), targets[start:start + BATCH].to(device), tta)
        pictures += [overlay_heatmap(pixels, heat) for pixels, heat in zip(seen_pixels(batch, prep), maps.numpy())]
    return pictures


def main() -> None:
    params = load_params().evaluate
    checkpoint = read_checkpoint(MODEL)
    table = read_predictions(checkpoint.classes)
    first, wrong = shown_predictions(table, params.grid_images)
    device = pick_device()
    model = checkpoint.classifier().to(device)
    prep = checkpoint.preprocessing
    layer = last_feature_map(model.backbone, prep.input_size)
    method = f"{GRAD_CAM} on {layer}" if layer else SALIENCY
    if layer is None:
        log.info("%s has no spatial last feature map: heat maps by %s", checkpoint.backbone, SALIENCY)
    for rows, path, heading in ((first, PREDICTIONS_HEATMAPS_PNG, "test predictions"),
                                (wrong, MISCLASSIFIED_HEATMAPS_PNG, "misclassified (most confident first)")):
        pictures = overlaid_heatmaps(model, layer, rows, prep, checkpoint.classes, checkpoint.tta, device)
        save_image_grid(pictures, *prediction_titles(rows), path,
                        f"{heading}: evidence for the predicted class ({method}, red = most)")
    log.info("heat maps (%s) of %d + %d test images at %d px in %s and %s", method, len(first), len(wrong),
             prep.input_size, PREDICTIONS_HEATMAPS_PNG, MISCLASSIFIED_HEATMAPS_PNG)


if __name__ == "__main__":
    run_stage(main)
