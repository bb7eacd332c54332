"""The pictures people look at: learning curves, a grid of predictions, the misclassified ones."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402

from stages.lib.files import atomic_path  # noqa: E402
from stages.lib.images import load_image  # noqa: E402


def save_figure(figure, path: Path, tight: bool = True) -> None:
    """A PNG, cropped to what is drawn unless `tight` is False (grids placed by the pixel)."""
    with atomic_path(path) as tmp:
        # zlib level 1: photo grids encode 3x faster than at the default 6, for files 10% larger
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight" if tight else None,
                       metadata={"Software": None}, pil_kwargs={"compress_level": 1})
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


def thumbnail_pixels(image: Path | np.ndarray, thumb: int) -> np.ndarray:
    """An image file, or pixels (HxWx3 uint8), shrunk to fit `thumb` x `thumb`."""
    from PIL import Image

    picture = load_image(image, thumb) if isinstance(image, Path) else Image.fromarray(image)
    picture.thumbnail((thumb, thumb))
    return np.asarray(picture)


def save_image_grid(images: Sequence[Path | np.ndarray], titles: Sequence[str], colors: Sequence[str], path: Path,
                    heading: str, thumb: int = 192) -> None:
    """A grid of thumbnails (of files, or of pixels) with a coloured title each (the recipe's
    visualize_model). The thumbnails are pasted at their own pixel size (figimage) under their
    titles, without an axes each: a 4x4 grid then draws in half the time, at the same size and look."""
    count = max(1, len(images))
    columns = min(4, count)
    rows = math.ceil(count / columns)
    cell_w, cell_h = 260, 256  # pixels at the figure's 100 dpi
    # the heading in lines that fit the grid's width (under 10 px a character at its 12 points)
    heading = "\n".join(textwrap.wrap(heading, (cell_w * columns - 20) // 10, break_on_hyphens=False))
    header = 32 + 18 * (heading.count("\n") + 1)
    width, height = cell_w * columns, cell_h * rows + header
    figure = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    for i, (image, title, color) in enumerate(zip(images, titles, colors)):
        row, column = divmod(i, columns)
        pixels = thumbnail_pixels(image, thumb)
        top = header + row * cell_h + 44  # room for a two-line title above the thumbnail
        figure.figimage(pixels, xo=column * cell_w + (cell_w - pixels.shape[1]) // 2,
                        yo=height - top - pixels.shape[0], origin="upper")
        figure.text((column + 0.5) * cell_w / width, 1 - (top - 4) / height, title, ha="center", va="bottom",
                    color=color, fontsize=9)
    if not len(images):
        figure.text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    figure.suptitle(heading, y=1 - 12 / height, va="top")
    save_figure(figure, path, tight=False)


def prediction_titles(rows) -> tuple[list[str], list[str]]:
    """Titles and colours of predictions (rows of metrics/predictions.csv): predicted vs true,
    green when right, red when wrong."""
    titles = [f"predicted: {p} ({q:.2f})\ntrue: {t}"
              for p, q, t in zip(rows["predicted"], rows["probability"], rows["true"])]
    return titles, ["tab:green" if p == t else "tab:red" for p, t in zip(rows["predicted"], rows["true"])]


def overlay_heatmap(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A heat map (HxW, 0..1) in the jet colours over an image (HxWx3, 0..1), as uint8 pixels.
    The colour covers more where the heat is higher, so what the model ignores stays visible."""
    heat = np.clip(heat, 0, 1)
    colored = matplotlib.colormaps["jet"](heat)[..., :3]
    weight = (0.15 + 0.45 * heat)[..., None]
    return (np.clip((1 - weight) * image + weight * colored, 0, 1) * 255).round().astype(np.uint8)


def save_dataset_overview(index, classes: list[str], path: Path) -> None:
    """Images per class in each split, and the images' sizes: what a user should see before training."""
    splits = ("train", "val", "test")
    figure, (count_ax, size_ax) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.3 * len(classes) + 2)))
    positions = np.arange(len(classes))
    height = 0.8 / len(splits)
    for i, split in enumerate(splits):
        counts = index[index["split"] == split]["class"].value_counts().reindex(classes, fill_value=0)
        bars = count_ax.barh(positions + (i - 1) * height, counts.to_numpy(), height, label=split)
        count_ax.bar_label(bars, fontsize=7, padding=2)
    largest = index.groupby(["split", "class"]).size().max()
    count_ax.set(yticks=positions, yticklabels=classes, xlabel="images", title="images per class and split",
                 xlim=(0, largest * 1.4))  # room for the counts and the legend right of the longest bar
    count_ax.invert_yaxis()
    count_ax.legend(loc="upper right")
    size_ax.scatter(index["width"], index["height"], s=8, alpha=0.4)
    size_ax.set(xlabel="width (px)", ylabel="height (px)",
                title=f"image sizes (median {int(index['width'].median())} x {int(index['height'].median())})")
    size_ax.grid(alpha=0.3)
    save_figure(figure, path)


def save_view_grid(rows: Sequence[Sequence[np.ndarray]], row_titles: Sequence[str], path: Path, heading: str) -> None:
    """Rows of images (HxWx3, 0..1): the same picture in several views per row."""
    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2 * columns, 2.1 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (views, title) in enumerate(zip(rows, row_titles)):
        for c, view in enumerate(views):
            axes[r, c].imshow(np.clip(view, 0, 1))
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    figure.suptitle(heading)
    save_figure(figure, path)


def save_titled_arrays(images: Sequence[np.ndarray], titles: Sequence[str], path: Path, heading: str,
                       columns: int = 2) -> None:
    """Images (HxWx3, 0..1) in a grid, each with its own title; "none" when there are none."""
    count = max(1, len(images))
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(np.clip(image, 0, 1))
        ax.set_title(title, fontsize=7)
    if not images:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    figure.suptitle(heading)
    save_figure(figure, path)


def save_class_curves(curves: dict[int, dict], classes: list[str], path: Path) -> None:
    """One-vs-rest ROC and precision-recall curves (metrics.class_curves), a line per class, its
    area in the legend."""
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for c, curve in curves.items():
        roc_ax.plot(curve["fpr"], curve["tpr"], label=f"{classes[c]} (AUC {curve['auc']:.3f})")
        pr_ax.step(np.r_[0, curve["recall"]], np.r_[1, curve["precision"]], where="post",
                   label=f"{classes[c]} (AP {curve['ap']:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one class vs the rest (test)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall, one class vs the rest (test)",
              ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize="small")
    save_figure(figure, path)


def save_reliability_diagram(series: dict[str, tuple[list[dict], float]], path: Path) -> None:
    """Accuracy against mean confidence per confidence bin, one series per name (before and
    after temperature scaling: its reliability table and ECE), the diagonal a perfectly
    calibrated model would follow."""
    figure, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for (name, (rows, ece)), marker in zip(series.items(), ("o", "s")):
        used = [r for r in rows if r["images"]]
        ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], marker=marker,
                label=f"{name} (ECE {ece:.3f})")
        for r in used:
            ax.annotate(str(r["images"]), (r["confidence"], r["accuracy"]), fontsize=7, alpha=0.6,
                        xytext=(3, -9), textcoords="offset points")
    ax.set(xlabel="confidence (top class, 15 bins)", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02),
           title="reliability on the test split\n(numbers: images in the bin)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    save_figure(figure, path)
