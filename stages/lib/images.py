"""Image files: which names are images, decoding one for a network, and checking one fully."""

from __future__ import annotations

import hashlib
import io
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

from PIL import Image
from tqdm import tqdm

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


def load_image(path: Path, min_size: int | None = None) -> Image.Image:
    """Decode an RGB image; with `min_size`, let a JPEG decode at a reduced scale no smaller
    than that, which is several times faster for large photos and loses nothing we keep."""
    with Image.open(path) as image:
        if min_size is not None:
            image.draft("RGB", (min_size, min_size))
        return image.convert("RGB")


def inspect_file(job: tuple[str, int]) -> tuple[str, int, int, str]:
    """(sha256, width, height, reason) for one file; reason is "" for a usable image."""
    path, max_pixels = job
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return "", 0, 0, f"unreadable ({err.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return digest, 0, 0, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return digest, width, height, (
                    f"decompression bomb: {width}x{height} pixels is over index.max_pixels ({max_pixels})"
                )
            image.load()  # decode every byte: a truncated or corrupt file fails here, not in training
    except Image.UnidentifiedImageError:
        return digest, 0, 0, "not an image"
    except Exception as err:  # PIL raises many types for corrupt data; all mean the same here
        return digest, 0, 0, f"corrupt or truncated image ({str(err) or type(err).__name__})"
    return digest, width, height, ""


def disable_pil_pixel_limit() -> None:
    # index.max_pixels is the limit; PIL's own would raise before we can report it.
    Image.MAX_IMAGE_PIXELS = None


def inspect_files(paths: list[Path], max_pixels: int, workers: int) -> Iterable[tuple[str, int, int, str]]:
    """inspect_file for each path, in order, in `workers` processes."""
    jobs = [(str(path), max_pixels) for path in paths]
    progress = dict(total=len(jobs), desc="validating images", unit="img", disable=None)
    if workers == 1:
        disable_pil_pixel_limit()
        yield from tqdm(map(inspect_file, jobs), **progress)
        return
    # spawn, not fork: forking a process that already runs threads (torch's, in the tests or a
    # notebook) can deadlock the children on a lock held at fork time.
    with get_context("spawn").Pool(workers, initializer=disable_pil_pixel_limit) as pool:
        yield from tqdm(pool.imap(inspect_file, jobs, chunksize=8), **progress)
