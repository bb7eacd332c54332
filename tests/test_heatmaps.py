"""Stage `heatmaps` and where-the-model-looks maps (stages/lib/heatmaps.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from stages import evaluate, heatmaps
from stages.lib.backbones import create_backbone, resolve_backbone
from stages.lib.checkpoint import read_checkpoint
from stages.lib.classifier import Classifier, build_classifier
from stages.lib.cli import UserError
from stages.lib.heatmaps import class_heatmaps, last_feature_map
from stages.lib.inference import batch_probabilities
from stages.lib.metrics import shown_predictions

SIZE, PATCH = 96, 32  # the tiny EfficientNet's last map is 1/32 of the input: one cell per patch place


def patch_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Noise with two squares in distinct places of a 3x3 grid: a red (class 0) or green (class 1)
    one that decides the class, and a blue one in every image that does not. Normalised images,
    labels, and each class square's top-left corner."""
    generator = np.random.default_rng(seed)
    images = generator.uniform(0.3, 0.7, (count, 3, SIZE, SIZE)).astype("float32")
    labels = generator.integers(0, 2, count)
    places = [(row, column) for row in range(0, SIZE, PATCH) for column in range(0, SIZE, PATCH)]
    corners = []
    for image, label in zip(images, labels):
        deciding, distracting = generator.choice(len(places), 2, replace=False)
        for (row, column), color in ((places[deciding], (1, 0, 0) if label == 0 else (0, 1, 0)),
                                     (places[distracting], (0, 0, 1))):
            image[:, row:row + PATCH, column:column + PATCH] = np.array(color, "float32")[:, None, None]
        corners.append(places[deciding])
    return torch.tensor((images - 0.5) / 0.5), torch.tensor(labels), corners


def share_of_peaks_on(maps: torch.Tensor, corners: list[tuple[int, int]]) -> float:
    hits = 0
    for heat, (row, column) in zip(maps, corners):
        peak_row, peak_column = divmod(int(heat.argmax()), heat.shape[1])
        hits += row <= peak_row < row + PATCH and column <= peak_column < column + PATCH
    return hits / len(corners)


@pytest.fixture(scope="module")
def patch_model() -> Classifier:
    """The tiny EfficientNet, from random weights, trained until it tells the squares apart."""
    torch.manual_seed(0)
    model = build_classifier("timm:test_efficientnet", 2, {"kind": "linear", "hidden": 0, "dropout": 0.0})
    images, labels, _ = patch_images(512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(30):
        batch = torch.randint(0, len(images), (16,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow  # trains a tiny network for 6 s
@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_grad_cam_peaks_on_the_patch_that_decides_the_class(patch_model, tta):
    images, labels, corners = patch_images(64, seed=1)
    with torch.no_grad():
        predicted = patch_model(images).argmax(1)
    assert (predicted == labels).float().mean() >= 0.95  # else the test would say nothing of the maps
    layer = last_feature_map(patch_model.backbone, SIZE)
    assert layer == "bn2"
    maps = class_heatmaps(patch_model, layer, images, predicted, tta)
    assert maps.shape == (64, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert share_of_peaks_on(maps, corners) >= 0.9


class RegionScore(nn.Module):
    """Scores an image by the colours of one region only (rows 8-15, columns 40-55)."""

    def forward(self, images):
        return images[:, :, 8:16, 40:56].mean((2, 3))


def test_saliency_shows_the_region_that_scores_and_mirrors_back_under_hflip():
    torch.manual_seed(0)
    model = Classifier(RegionScore(), nn.Linear(3, 2)).eval()
    images = torch.randn(4, 3, 64, 64)
    classes = torch.tensor([0, 1, 0, 1])
    plain = class_heatmaps(model, None, images, classes, "none")
    for heat in plain:
        row, column = divmod(int(heat.argmax()), 64)
        assert 8 <= row < 16 and 40 <= column < 56
        assert heat[40:, :].max() < 0.05  # nothing far from the region
    # The mirror image is scored by what lies in columns 8-23 of the image: its map, mirrored back
    # onto the image, shows those columns beside the region itself, and nothing else.
    both = class_heatmaps(model, None, images, classes, "hflip")
    for heat in both:
        assert heat[8:16, 40:56].max() > 0.5 and heat[8:16, 8:24].max() > 0.5
        assert heat[40:, :].max() < 0.05 and heat[:, 26:38].max() < 0.05


@pytest.mark.parametrize("name, size, layer", [
    ("timm:test_efficientnet", 160, "bn2"), ("timm:test_resnet", 160, "layer4"),
    ("timm:test_convnext", 160, "norm_pre"), ("torchvision:resnet18", 64, "layer4"),
    ("timm:test_vit", 160, None),  # tokens, not a map: saliency instead
])
def test_the_last_spatial_map_is_found_or_its_absence_reported(name, size, layer):
    backbone, _ = create_backbone(resolve_backbone(name))
    assert last_feature_map(backbone, size) == layer


def test_heatmaps_show_evaluate_pictures_on_the_model_as_evaluated(trained_copy):
    evaluate.main()
    heatmaps.main()
    checkpoint = read_checkpoint(trained_copy / "models/model.safetensors")
    table = pd.read_csv(trained_copy / "metrics/predictions.csv")
    first, wrong = shown_predictions(table, 4)
    for picture in ("predictions_heatmaps.png", "misclassified_heatmaps.png"):
        with Image.open(trained_copy / "metrics/eval" / picture) as image:
            assert image.width >= 260
    # The images the maps are computed on are the ones evaluate scored: through the same model they
    # give evaluate's probabilities.
    images, targets = heatmaps.model_inputs(first, checkpoint.preprocessing, checkpoint.classes)
    probs = batch_probabilities(checkpoint.classifier(), images, torch.device("cpu"), checkpoint.tta).detach().numpy()
    expected = first[[f"prob_{name}" for name in checkpoint.classes]].to_numpy()
    assert np.abs(probs - expected).max() < 1e-4
    assert [checkpoint.classes[i] for i in targets] == first["predicted"].tolist()
    assert len(heatmaps.overlaid_heatmaps(checkpoint.classifier(), "bn2", first, checkpoint.preprocessing,
                                          checkpoint.classes, checkpoint.tta, torch.device("cpu"))) == len(first)


def test_heatmaps_before_evaluate_say_what_to_do(trained_copy):
    with pytest.raises(UserError, match="metrics/predictions.csv: not found; run the evaluate stage"):
        heatmaps.main()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 8])
def test_a_grid_heading_stays_whole_inside_the_picture(tmp_path, monkeypatch, count):
    from stages.lib import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path, tight=True: drawn.append(figure))
    heading = "misclassified (most confident first): evidence for the predicted class (grad-cam, red = most)"
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    plots.save_image_grid([pixels] * count, ["a\nb"] * count, ["black"] * count, tmp_path / "grid.png", heading)
    figure = drawn[0]
    renderer = figure.canvas.get_renderer()
    box, frame = figure._suptitle.get_window_extent(renderer), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
    assert figure._suptitle.get_text().replace("\n", " ") == heading
    # and above the first row's titles
    titles = [text.get_window_extent(renderer) for text in figure.texts if text.get_text() == "a\nb"]
    assert all(title.y1 < box.y0 for title in titles)
