"""Image files: which names are images, decoding one for a network, and checking one fully.

numpy and pillow alone at import: the export stage ships this file in the exported folder, whose
predict.py decodes images exactly as the pipeline does."""

from __future__ import annotations

import hashlib
import io
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (hidden parts skipped), each path once, in order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return list(dict.fromkeys(found))


# Transparent pixels are composited on this fixed colour, not left as whatever the file stores
# under them (often black or garbage): white, the background of most cut-out product photos.
BACKGROUND = (255, 255, 255)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per channel
PLAIN_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV")  # PIL converts these to RGB faithfully


class UnsupportedImage(ValueError):
    """An image PIL decodes but we cannot turn into RGB faithfully."""


def scaled_to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Wide pixel values onto 0..255 by their type's range, not by clipping (which whitens
    a 16-bit image): 16-bit by 1/257; floats in 0..1 by 255; anything else by its own min and max."""
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled = pixels / 257
    elif (mode == "I" and low >= 0 and high <= 255):
        scaled = pixels
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = pixels * 255
    else:
        scaled = (pixels - low) * (255 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: wide values scaled, transparency composited on BACKGROUND."""
    if image.mode in WIDE_MODES:
        return Image.fromarray(scaled_to_8_bits(np.asarray(image), image.mode)).convert("RGB")
    if has_transparency(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    if image.mode in PLAIN_MODES:
        return image.convert("RGB")
    raise UnsupportedImage(f"image mode {image.mode} is not supported")


def upright_rgb(image: Image.Image) -> Image.Image:
    """The first frame, turned as its EXIF orientation says (phone photos), as RGB."""
    image.seek(0)
    return to_rgb(ImageOps.exif_transpose(image))


def load_image(path: Path, min_size: int | None = None) -> Image.Image:
    """Decode an image as everything downstream sees it: upright, RGB, first frame. With
    `min_size`, a JPEG may decode at a reduced scale no smaller than that, which is several times
    faster for large photos and loses nothing we keep. Every stage and command that reads an
    image comes here."""
    with Image.open(path) as image:
        if min_size is not None:
            image.draft("RGB", (min_size, min_size))
        return upright_rgb(image)


def inspect_file(job: tuple[str, int], known: dict | None = None) -> tuple[str, int, int, str]:
    """(sha256, width, height, reason) for one file; reason is "" for a usable image. The size is
    the upright image's, as load_image gives it. A file whose content is in `known` (sha256 ->
    [width, height, reason], from an earlier run with the same limits) is read and hashed, not decoded."""
    path, max_pixels = job
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return "", 0, 0, f"unreadable ({err.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if known and digest in known:
        width, height, reason = known[digest]
        return digest, width, height, reason
    if not data:
        return digest, 0, 0, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return digest, width, height, (
                    f"decompression bomb: {width}x{height} pixels is over index.max_pixels ({max_pixels})"
                )
            # Decode every byte: a truncated or corrupt file fails here, not in training.
            width, height = upright_rgb(image).size
    except Image.UnidentifiedImageError:
        return digest, 0, 0, "not an image"
    except UnsupportedImage as err:
        return digest, 0, 0, str(err)
    except Exception as err:  # PIL raises many types for corrupt data; all mean the same here
        return digest, 0, 0, f"corrupt or truncated image ({str(err) or type(err).__name__})"
    return digest, width, height, ""


def disable_pil_pixel_limit() -> None:
    # index.max_pixels is the limit; PIL's own would raise before we can report it.
    Image.MAX_IMAGE_PIXELS = None


_known_in_worker: dict = {}  # a validation worker's copy of inspect_files' `known`


def start_inspector(known: dict) -> None:
    global _known_in_worker
    disable_pil_pixel_limit()
    _known_in_worker = known


def inspect_in_worker(job: tuple[str, int]) -> tuple[str, int, int, str]:
    return inspect_file(job, _known_in_worker)


def inspect_files(paths: list[Path], max_pixels: int, workers: int,
                  known: dict | None = None) -> Iterable[tuple[str, int, int, str]]:
    """inspect_file for each path, in order, in `workers` processes."""
    from tqdm import tqdm

    jobs = [(str(path), max_pixels) for path in paths]
    progress = dict(total=len(jobs), desc="validating images", unit="img", disable=None)
    if workers == 1:
        disable_pil_pixel_limit()
        yield from tqdm((inspect_file(job, known) for job in jobs), **progress)
        return
    # spawn, not fork: forking a process that already runs threads (torch's, in the tests or a
    # notebook) can deadlock the children on a lock held at fork time. Each worker gets `known`
    # once, when it starts.
    with get_context("spawn").Pool(workers, initializer=start_inspector, initargs=(known or {},)) as pool:
        yield from tqdm(pool.imap(inspect_in_worker, jobs, chunksize=8), **progress)
