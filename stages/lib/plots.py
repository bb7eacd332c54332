"""The pictures people look at: learning curves, a grid of predictions, the misclassified ones."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from stages.lib.files import atomic_path  # noqa: E402


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)


def save_learning_curves(history: Sequence, best_epoch: int, path: Path) -> None:
    """Loss and accuracy per epoch for train and val, the chosen epoch marked."""
    epochs = [r.epoch for r in history]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(epochs, [getattr(r, f"train_{metric}") for r in history], label="train", marker=".")
        ax.plot(epochs, [getattr(r, f"val_{metric}") for r in history], label="val", marker=".")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best (epoch {best_epoch})")
        switch = next((r.epoch for r in history if r.phase == "network"), None)
        if switch is not None and switch != epochs[0]:
            ax.axvspan(epochs[0] - 0.5, switch - 0.5, color="tab:green", alpha=0.08, label="head on cached features")
        ax.set_xlabel("epoch")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    save_figure(figure, path)


def save_confusion_matrix(confusion, classes: list[str], path: Path) -> None:
    """Counts of true (rows) vs predicted (columns) class, as a picture for reports (DVC draws
    its own from the CSV); drawn like scikit-learn's ConfusionMatrixDisplay."""
    size = max(4, 0.6 * len(classes) + 2)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    threshold = confusion.max() / 2
    for (row, column), count in np.ndenumerate(confusion):
        ax.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="Predicted label", ylabel="True label", title="test confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center")
    save_figure(figure, path)


def save_image_grid(images: Sequence[Path], titles: Sequence[str], colors: Sequence[str], path: Path,
                    heading: str, thumb: int = 192) -> None:
    """A grid of thumbnails with a coloured title each (the recipe's visualize_model)."""
    count = max(1, len(images))
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image_path, title, color in zip(axes.flat, images, titles, colors):
        with Image.open(image_path) as image:
            image.draft("RGB", (thumb, thumb))
            image = image.convert("RGB")
            image.thumbnail((thumb, thumb))
            ax.imshow(image)
        ax.set_title(title, color=color, fontsize=9)
    if not images:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    figure.suptitle(heading)
    save_figure(figure, path)
