"""Shared fixtures: a project directory with params.yaml, and tiny generated images and archives."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory holding the project's params.yaml with `overrides`; stages run in it."""

    def make(**overrides) -> Path:
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides)))
        monkeypatch.chdir(tmp_path)
        return tmp_path

    return make


def image_bytes(color=(200, 30, 30), size=(24, 16), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, color=(200, 30, 30), size=(24, 16), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color, size, fmt))
    return path


def write_gradient_image(path: Path, color: tuple[int, int, int], size=(40, 30)) -> Path:
    """A colour fading to black from left to right: crops and flips of it differ."""
    import numpy as np

    fade = np.linspace(1.0, 0.2, size[0])[None, :, None]
    pixels = (np.array(color)[None, None, :] * fade * np.ones((size[1], 1, 1))).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def distinct_color(i: int) -> tuple[int, int, int]:
    """Colours that differ per image, so no two generated images share a content hash."""
    return (i * 37 % 256, i * 91 % 256, (i * 13 + i // 256) % 256)


def make_image_tree(root: Path, counts: dict[str, int], start: int = 0) -> int:
    """Write counts[class] distinct images into root/<class>/; returns the next colour number.

    PNG, because it is lossless: distinct colours give distinct bytes, so no accidental duplicates.
    """
    i = start
    for class_name, n in counts.items():
        for _ in range(n):
            write_image(root / class_name / f"img_{i:04d}.png", color=distinct_color(i), fmt="PNG")
            i += 1
    return i


def zip_tree(source: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as archive:
        for path in sorted(source.rglob("*")):
            archive.write(path, path.relative_to(source).as_posix())
    return dest


# --- a tiny training project: generated images and a tiny randomly initialised backbone ------

TINY_BACKBONE = "timm:test_efficientnet"


def tiny_training_params(weights: str, **overrides) -> dict:
    params = {
        "strategy": "frozen",
        "model": {"backbone": TINY_BACKBONE, "weights": weights},
        "features": {"views": 1, "batch_size": 16},
        "train": {"epochs": 2, "head_epochs": 3, "batch_size": 8, "workers": 0, "lr": 0.01},
        "evaluate": {"batch_size": 16, "grid_images": 4},
    }
    return deep_merge(params, overrides)


def write_random_backbone(path: Path, seed: int = 0) -> Path:
    """A state dict for the tiny backbone, standing in for downloaded pretrained weights."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(TINY_BACKBONE.removeprefix("timm:"), pretrained=False)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def tiny_project(project, tmp_path_factory):
    """Run download-free data stages on generated images; returns (root, make_params)."""
    from stages import features, index, weights

    weights_file = write_random_backbone(tmp_path_factory.mktemp("weights") / "tiny_backbone.pt")

    def make(run_features: bool = True, **overrides) -> Path:
        root = project(**tiny_training_params(str(weights_file), **overrides))
        if not (root / "data/raw").exists():
            # Two visually distinct classes, so that even a tiny network can learn something.
            for i in range(14):
                write_gradient_image(root / f"data/raw/red/r_{i:02d}.png", (200 + i, 20, 20 + i))
                write_gradient_image(root / f"data/raw/blue/b_{i:02d}.png", (20, 20 + i, 200 + i))
        index.main()
        weights.main()
        if run_features:
            features.main()
        return root

    return make
