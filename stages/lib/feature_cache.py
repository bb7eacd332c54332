"""Per-image features kept between runs, so that a few new images cost a few backbone passes.

data/cache/features/ is an output of the features stage marked `persist: true` in dvc.yaml: DVC
does not delete it before the stage runs, stores each of its files once in its cache (a new run
adds only its new files), and pushes and pulls it like any output. Each image's vector of one view
is a file `<setting>/<view>/<sha256[:2]>/<sha256>.vec`: a 16-byte BLAKE2b checksum of the vector
and of that place, then the vector (float32, little-endian). An entry that is truncated, of another kind, altered or
not finite is logged with its path, removed and computed again: a damaged cache heals itself in
the run that finds it, and the run writes what a run from an empty cache writes.

- the setting is a hash of what makes the backbone's output for an image: the pretrained weights
  (their file's sha256), the preprocessing (sizes, normalisation, interpolation) and the versions
  of torch, torchvision, timm and Pillow;
- the view is `plain`, `hflip`, or `augmented_<i>-<hash>`, the hash of the augment params and
  `features.seed`, since an augmented view is drawn from a generator seeded by (features.seed, the
  image's content hash, i): it depends on nothing else, so it is the same in any run;
- the image is its content's sha256 (the index's column): a renamed file is still known, an
  edited one is new.

A change of backbone, weights, preprocessing or augmentation is a new setting or view: everything is
computed, as without a cache. After each run only the current setting's files of images in the
index remain, so the cache never outgrows one run's features.

The export stage keeps data/cache/export/ the same way, for the exported ONNX backbones (fp32 and
INT8) on the test images it scores to decide whether INT8 ships: there the setting is a hash of the
ONNX file itself (`onnx_setting_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from stages.lib.files import atomic_path, file_sha256
from stages.lib.params import AugmentParams
from stages.lib.preprocessing import Preprocessing

log = logging.getLogger("cache")
DIGEST = 16  # bytes of BLAKE2b before each vector: a checksum, so that no altered entry is used
VECTOR = np.dtype("<f4")


def short_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def setting_key(pretrained_sha256: str, prep: Preprocessing) -> str:
    """The backbone's weights and input, and the versions of the code that computes and decodes
    (read from the installed packages' metadata: importing timm alone takes seconds, and a run that
    finds every vector cached needs none of it)."""
    return short_hash({"pretrained_sha256": pretrained_sha256, "preprocessing": prep.to_dict(),
                       "versions": [version(name) for name in ("torch", "torchvision", "timm", "pillow")]})


def onnx_setting_key(onnx_file: Path, side: dict) -> str:
    """An ONNX backbone's file and input (an export sidecar's sizes, normalisation and
    interpolation), and the versions of the runtime and the decoder."""
    import onnxruntime  # its version from the module: onnxruntime-gpu and others install it under other names

    return short_hash({"onnx_sha256": file_sha256(onnx_file),
                       "preprocessing": {k: side[k] for k in ("input_size", "resize_size", "mean", "std",
                                                              "interpolation")},
                       "versions": [onnxruntime.__version__, version("pillow")]})


def view_key(view: str, augment: AugmentParams, seed: int) -> str:
    if not view.startswith("augmented_"):
        return view
    return f"{view}-{short_hash({'augment': augment.model_dump(), 'seed': seed})}"


def vector_path(root: Path, view: str, sha256: str) -> Path:
    return root / f"{view}/{sha256[:2]}/{sha256}.vec"  # one join, not three: called for every vector


def digest(path: Path, payload: bytes) -> bytes:
    """The checksum of an entry: of its vector and of where it lies in the cache (setting, view,
    image), so that an entry copied over another image's is caught too."""
    place = "/".join(path.parts[-4:]).encode()  # <setting>/<view>/<sha256[:2]>/<sha256>.vec
    return hashlib.blake2b(place + b"\0" + payload, digest_size=DIGEST).digest()


def entry_bytes(path: Path, vector: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(vector, dtype=VECTOR).tobytes()
    return digest(path, payload) + payload


def entry_vector(path: Path, data: bytes) -> np.ndarray:
    """The vector the entry at `path` holds; ValueError saying what is wrong with it."""
    if len(data) <= DIGEST or (len(data) - DIGEST) % VECTOR.itemsize:
        raise ValueError(f"{len(data)} bytes, not a checksum and a float32 vector")
    payload = data[DIGEST:]
    if digest(path, payload) != data[:DIGEST]:
        raise ValueError("its checksum does not match its content")
    vector = np.frombuffer(payload, dtype=VECTOR)
    if not np.isfinite(vector).all():
        raise ValueError("not finite")
    return vector


def read_entry(path: Path) -> np.ndarray | None:
    """An entry's vector; None if it is missing or damaged (then it is logged and removed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return entry_vector(path, data)
    except ValueError as error:
        log.warning("%s: damaged cache entry (%s): removed, computed again", path, error)
        path.unlink()
        return None


def cached_vectors(root: Path, views: list[str], sha256s: list[str]) -> list[np.ndarray | None]:
    """Each image's vectors [views, width] from the cache; None for an image that lacks the entry
    of a view, or whose entry was damaged."""
    found: list[np.ndarray | None] = []
    for sha in sha256s:
        vectors = [read_entry(vector_path(root, view, sha)) for view in views]
        found.append(None if any(v is None for v in vectors) else np.stack(vectors))
    return found


def write_vectors(root: Path, views: list[str], sha256: str, vectors: np.ndarray) -> None:
    """One image's vectors [views, width], each entry written whole or not at all."""
    for view, vector in zip(views, vectors):
        path = vector_path(root, view, sha256)
        with atomic_path(path) as temporary:
            temporary.write_bytes(entry_bytes(path, vector))


def entry_paths(root: Path, views: list[str], sha256s: list[str]) -> set[Path]:
    """The cache files of these images' vectors (what prune keeps)."""
    return {vector_path(root, view, sha) for view in views for sha in sha256s}


def filled(root: Path, views: list[str], sha256s: list[str], compute) -> tuple[np.ndarray, list[int]]:
    """The images' vectors [images, views, width]: the cache's, and `compute(indices)`'s
    ([len(indices), views, width]) for the images it lacks, which then join the cache. Also those
    indices."""
    found = cached_vectors(root, views, sha256s)
    missing = [i for i, vectors in enumerate(found) if vectors is None]
    if missing:
        computed = np.asarray(compute(missing), dtype=VECTOR)
        for i, vectors in zip(missing, computed):
            write_vectors(root, views, sha256s[i], vectors)
            found[i] = vectors
    return np.stack(found), missing


def prune(cache: Path, settings: set[str], keep: set[Path]) -> tuple[int, int]:
    """Remove every file under `cache` but `keep` (files of `settings`), and every other setting
    (a folder, or a file); returns the files and bytes left."""
    files = size = 0
    for entry in cache.iterdir() if cache.is_dir() else []:
        if entry.name not in settings:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif entry.is_file():  # a setting may be a file of its own (the export's INT8 backbone)
            files, size = files + 1, size + entry.stat().st_size
    for setting in sorted(settings):
        for path in sorted((cache / setting).rglob("*")) if (cache / setting).is_dir() else []:
            if path.is_file():
                if path in keep:
                    files, size = files + 1, size + path.stat().st_size
                else:
                    path.unlink()
        for folder in sorted((p for p in (cache / setting).rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    return files, size
