"""Shared fixtures: a project directory with params.yaml, and tiny generated images and archives."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The files that take most of the suite's time (about a minute and a half each on 2 cores) run
# first, one per worker, so that the short files fill in around them and both workers finish
# together; pyproject's --no-loadscope-reorder keeps this order (xdist would order by test count).
LONGEST_FILES = ("test_pipeline.py", "test_train.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # stable: the rest keep their order


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
        # One process validates the few images a test makes: a pool's start costs more than it
        # saves there (test_parallel_and_serial_validation_agree and the e2e tests use the pool).
        params["index"]["workers"] = 1
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


# --- heads on cached features, trained in the test's process ---------------------------------

def params_with_train(**train):
    """The project's params.yaml, loaded, with these train settings."""
    from stages.lib.params import load_params

    params = load_params(PROJECT_ROOT / "params.yaml")
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def random_feature_split(images: int, classes: int, width: int, seed: int = 0) -> dict:
    """Cached features of a split as lib/features.py reads them (plain and mirrored views), random
    around each image's label: what a head learns from."""
    import numpy as np

    generator = np.random.default_rng(seed)
    labels = generator.integers(0, classes, images)
    return {"features": (generator.normal(size=(images, 2, width)) + labels[:, None, None]).astype(np.float32),
            "labels": labels, "views": ["plain", "hflip"]}


# --- a tiny training project: generated images and a tiny randomly initialised backbone ------

TINY_BACKBONE = "timm:test_efficientnet"


def tiny_training_params(weights: str, **overrides) -> dict:
    params = {
        "strategy": "frozen",
        "model": {"backbone": TINY_BACKBONE, "weights": weights},
        "features": {"views": 1, "batch_size": 16},
        "train": {"epochs": 2, "head_epochs": 3, "batch_size": 8, "workers": 0, "lr": 0.01},
        "evaluate": {"batch_size": 16, "grid_images": 4},
        "suspects": {"folds": 3, "epochs": 3},
        "latency": {"runs": 3},
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


# Data stages (index, weights, features) take seconds each: every distinct set of the params they
# read is prepared once per session, and each test gets a copy of that prepared project.
DATA_SECTIONS = ("index", "features", "augment")
DATA_MODEL_KEYS = ("backbone", "weights", "tta")


def data_key(params: dict) -> str:
    import json

    relevant = {name: params[name] for name in DATA_SECTIONS}
    relevant["model"] = {key: params["model"][key] for key in DATA_MODEL_KEYS}
    return json.dumps(relevant, sort_keys=True)


def write_tiny_images(root: Path) -> None:
    """Two visually distinct classes, so that even a tiny network can learn something."""
    for i in range(14):
        write_gradient_image(root / f"data/raw/red/r_{i:02d}.png", (200 + i, 20, 20 + i))
        write_gradient_image(root / f"data/raw/blue/b_{i:02d}.png", (20, 20 + i, 200 + i))


def run_data_stages(root: Path, run_features: bool) -> None:
    import os

    from stages import features, index, weights

    here = Path.cwd()
    os.chdir(root)
    try:
        index.main()
        weights.main()
        if run_features:
            features.main()
    finally:
        os.chdir(here)


@pytest.fixture(scope="session")
def tiny_backbone_file(tmp_path_factory) -> Path:
    return write_random_backbone(tmp_path_factory.mktemp("weights") / "tiny_backbone.pt")


@pytest.fixture(scope="session")
def prepared_projects(tmp_path_factory, tiny_backbone_file):
    """Tiny projects with their data stages run, one per distinct set of data params."""
    import shutil

    prepared: dict[str, Path] = {}

    def prepare(params: dict, run_features: bool) -> Path:
        key = data_key(params) + str(run_features)
        if key not in prepared:
            root = tmp_path_factory.mktemp("prepared")
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            write_tiny_images(root)
            run_data_stages(root, run_features)
            prepared[key] = root
        return prepared[key]

    prepare.copy = lambda source, target: shutil.copytree(source, target, dirs_exist_ok=True)
    return prepare


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, tiny_backbone_file, prepared_projects):
    """A copy of a prepared tiny project with `overrides`, as the working directory; returns its root."""

    def make(run_features: bool = True, **overrides) -> Path:
        base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        params = deep_merge(base, tiny_training_params(str(tiny_backbone_file), **overrides))
        source = prepared_projects(params, run_features)
        root = tmp_path / "project"
        if root.exists():
            import shutil

            shutil.rmtree(root)
        prepared_projects.copy(source, root)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.chdir(root)
        return root

    return make


def train_with_library(root: Path) -> Path:
    """models/model.safetensors for the params in `root`, trained as the train stage trains it
    (lib/training.train_and_calibrate), without its DVCLive records: what evaluate, export and
    predict tests start from."""
    import os

    import torch

    from stages.lib.params import load_params
    from stages.lib.training import train_and_calibrate

    here = Path.cwd()
    os.chdir(root)
    try:
        train_and_calibrate(load_params(), torch.device("cpu"))
    finally:
        os.chdir(here)
    return root / "models/model.safetensors"


@pytest.fixture(scope="session")
def trained_frozen(prepared_projects, tiny_backbone_file, tmp_path_factory) -> Path:
    """A tiny project with a frozen model trained once per session; tests copy it (trained_copy)."""
    base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params = deep_merge(base, tiny_training_params(str(tiny_backbone_file), strategy="frozen"))
    root = tmp_path_factory.mktemp("trained")
    prepared_projects.copy(prepared_projects(params, True), root)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    train_with_library(root)
    return root


@pytest.fixture
def trained_copy(trained_frozen, tmp_path, monkeypatch) -> Path:
    """A copy of the session's trained tiny project, as the working directory."""
    import shutil

    root = tmp_path / "trained"
    shutil.copytree(trained_frozen, root)
    monkeypatch.chdir(root)
    return root
