"""Speed and memory of the index stage on many generated JPEGs.

    python -m bench.index_speed [--images 5000] [--workers 0]

Writes JPEGs from 200 to 1000 px (noise, so they do not compress to nothing) into a temporary
project, runs the index stage there in a child process, and prints images per second and the
peak RSS of the stage with all its worker processes. Run it twice with different --images to see
that peak memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_images(raw: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = rng.integers(200, 1001, size=2)
        pixels = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((int(width), int(height)), Image.BILINEAR)
        folder = raw / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img_{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=0, help="index.workers; 0 = one per core")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "data/raw", args.images)
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        params["index"]["workers"] = args.workers
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.index"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    # ru_maxrss of children: the largest of the stage and its workers, in KiB on Linux.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"index: {args.images} images in {seconds:.1f} s = {args.images / seconds:.0f} images/s "
          f"on {os.cpu_count()} cores, peak RSS of one process {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
