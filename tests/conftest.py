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
