"""Time and memory against the number of images, in one run on one machine.

    python -m bench.scale [--sizes 1000 5000 20000] [--memory-sizes 1000 10000 50000]

Run it in a throwaway clone with its own DVC cache and a committed pipeline: it rewrites
params.yaml and reproduces there. Generated datasets (coloured shapes, a class each, on noise) in
a folder source beside the clone; strategy frozen and efficientnet_lite0, so that the largest size
runs in minutes on two cores (the default's network phase would take most of an hour per epoch
there, the same in every case below, and say nothing of the caches). For each size:
(a) `dvc repro` (the experiment loop, dvc.yaml) from an empty cache, then `dvc repro
--all-pipelines` (shipping and audits, release/ and audit/dvc.yaml, on top of it), (b) 1% more
images in the folder and the same two commands, (c) a head-only `dvc exp run -S train.lr=X`; each
stage's seconds, from the moment DVC starts it to the moment it starts the next (its outputs'
hashing and caching included), and the seconds to md5 every image once, as DVC does for
data/raw. Then the train stage's peak RSS on cached features of 1,000, 10,000 and 50,000 images
(random features with a class signal, written directly: the backbone would take an hour to make
50,000 real ones). Writes bench/results/scale.md and .png and
docs/scaling.md's `scale` block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from bench.publish import machine, publish

RESULTS = Path("bench/results/scale.md")
PICTURE = Path("bench/results/scale.png")
RAW = Path("bench/results/scale.json")  # every figure of the last run, for --plot-only
SHAPES = ("circle", "square", "triangle", "cross")
# train.lr back to its default at each size: (c) sets another one
SETTINGS = {"strategy": "frozen", "model": {"backbone": "efficientnet_lite0"}, "train": {"lr": 0.001}}


def draw_image(path: Path, shape: str, generator: np.random.Generator) -> None:
    """A coloured shape at a random place and size on noise: the class is the shape."""
    size = 96
    pixels = generator.integers(60, 196, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    radius = int(generator.integers(14, 30))
    x, y = (int(v) for v in generator.integers(radius, size - radius, 2))
    color = tuple(int(v) for v in generator.integers(0, 256, 3))
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=color)
    else:
        draw.rectangle((x - radius, y - radius // 3, x + radius, y + radius // 3), fill=color)
        draw.rectangle((x - radius // 3, y - radius, x + radius // 3, y + radius), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def add_images(folder: Path, start: int, count: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    for i in range(start, start + count):
        shape = SHAPES[i % len(SHAPES)]
        draw_image(folder / shape / f"{i:06d}.jpg", shape, generator)


def md5_seconds(folder: Path) -> float:
    """Reading and md5-hashing every file once: what DVC does to data/raw after download."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.jpg")):
        hashlib.md5(path.read_bytes()).hexdigest()
    return time.perf_counter() - started


def stage_times(command: list[str]) -> tuple[float, dict[str, float]]:
    """Run a DVC command; its wall seconds, and each stage's, from its "Running stage" line to the
    next stage's (or the end)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    marks, lines = [], []
    for line in process.stdout:
        lines.append(line)
        found = re.match(r"Running stage '([^']+)'", line)
        if found:  # release/dvc.yaml:export as export
            marks.append((found.group(1).split(":")[-1], time.perf_counter()))
    process.wait()
    ended = time.perf_counter()
    if process.returncode:
        print("".join(lines[-60:]))
        raise SystemExit(f"failed: {' '.join(command)}")
    times = {name: (marks[i + 1][1] if i + 1 < len(marks) else ended) - at for i, (name, at) in enumerate(marks)}
    print(f"$ {' '.join(command)}: {ended - started:.1f} s, " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()),
          flush=True)
    return ended - started, times


def peak_rss_mb(command: list[str]) -> float:
    """The largest resident set of `command` and the processes it waited for, in MB."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def write_params(changes: dict) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())

    def merge(base: dict, more: dict) -> dict:
        return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in more.items()}}

    Path("params.yaml").write_text(yaml.safe_dump(merge(params, changes), sort_keys=False))


def run_size(size: int, root: Path) -> dict:
    folder = root / f"shapes_{size}"
    shutil.rmtree(folder, ignore_errors=True)
    add_images(folder, 0, size, seed=size)
    shutil.rmtree("data/cache", ignore_errors=True)
    write_params({**SETTINGS, "data": {"url": str(folder.resolve()), "sha256": None}})
    full_seconds, full = stage_times(["dvc", "repro"])
    _, full_on_request = stage_times(["dvc", "repro", "--all-pipelines"])
    rss = peak_rss_mb([sys.executable, "-m", "stages", "train"])
    subprocess.run(["git", "add", "-A"], check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", f"scale bench: {size} images"], check=True, capture_output=True)
    added = max(1, size // 100)
    add_images(folder, size, added, seed=size + 1)
    more_seconds, more = stage_times(["dvc", "repro"])
    _, more_on_request = stage_times(["dvc", "repro", "--all-pipelines"])
    head_seconds, head = stage_times(["dvc", "exp", "run", "-S", "train.lr=0.0017"])
    if "train" not in head:
        raise SystemExit("the head-only experiment did not train; is train.lr already 0.0017?")
    on_request = lambda times: {k: v for k, v in times.items() if k != "check"}  # noqa: E731 - it always runs
    return {"images": size, "added": added, "full": full, "full_seconds": full_seconds, "more": more,
            "more_seconds": more_seconds, "head": head, "head_seconds": head_seconds,
            "full_on_request": on_request(full_on_request), "more_on_request": on_request(more_on_request),
            "md5_seconds": md5_seconds(folder), "train_peak_rss_mb": rss}


def synthetic_frozen_project(images: int) -> None:
    """index, classes and features files of `images` images (60/20/20, two views in train), the
    features random with a class signal: what a frozen train stage reads."""
    import pandas as pd

    from stages.lib.features import save_features
    from stages.lib.files import file_sha256
    from stages.lib.paths import CLASSES_JSON, INDEX_CSV, PRETRAINED

    generator = np.random.default_rng(0)
    classes = list(SHAPES)
    labels = generator.integers(0, len(classes), images)
    splits = np.array(["train", "val", "test"])[np.searchsorted([0.6, 0.8], generator.random(images), "right")]
    index = pd.DataFrame({"path": [f"s/{i}.jpg" for i in range(images)], "class": [classes[c] for c in labels],
                          "label": labels, "split": splits, "sha256": [f"{i:064x}" for i in range(images)],
                          "width": 96, "height": 96})
    index.to_csv(INDEX_CSV, index=False)
    CLASSES_JSON.write_text(json.dumps(classes))
    centres = generator.normal(0, 1, (len(classes), 1280)).astype(np.float32)
    source = {"backbone": "efficientnet_lite0", "pretrained_sha256": file_sha256(PRETRAINED),
              "preprocessing": {"input_size": 224, "resize_size": 256, "mean": [0.5] * 3, "std": [0.5] * 3,
                                "interpolation": "bicubic"}}
    for split, views in (("train", ["plain", "hflip"]), ("val", ["plain"]), ("test", ["plain"])):
        rows = index[index.split == split]
        features = centres[rows.label.to_numpy()][:, None, :] + generator.normal(
            0, 3, (len(rows), len(views), 1280)).astype(np.float32)
        save_features(split, {**source, "views": views, "features": features, "labels": rows.label.to_numpy(),
                              "paths": rows.path.tolist()})


def memory_rows(sizes: list[int]) -> list[tuple[int, float, float]]:
    """(images, features MB, train stage peak RSS MB) for a frozen train stage on each size."""
    from stages.lib.paths import features_file

    rows = []
    for size in sizes:
        synthetic_frozen_project(size)
        features_mb = sum(features_file(s).stat().st_size for s in ("train", "val", "test")) / 1e6
        rss = peak_rss_mb([sys.executable, "-m", "stages", "train"])
        print(f"{size} images: features {features_mb:.0f} MB, train stage peak RSS {rss:.0f} MB", flush=True)
        rows.append((size, features_mb, rss))
    return rows


def draw(results: list[dict], picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["images"] for r in results]
    stages = list(dict.fromkeys(s for r in results for s in r["full"]))
    colors = {stage: plt.get_cmap("tab20")(i % 20) for i, stage in enumerate(stages)}
    figure, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    for ax, case, title in zip(axes, ("full", "more", "head"),
                               ("(a) from an empty cache", "(b) 1% more images", "(c) a head-only experiment")):
        for stage in stages:
            # A stage that did not run at a size has no point there.
            seconds = [r[case].get(stage, float("nan")) for r in results]
            if any(v == v for v in seconds):
                ax.plot(sizes, seconds, marker="o", color=colors[stage], label=stage)
        ax.plot(sizes, [r["md5_seconds"] or float("nan") for r in results], color="black", linestyle=":",
                label="md5 of every image")
        ax.set(xscale="log", yscale="log", xlabel="images", title=title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("seconds per stage")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize="small")
    figure.suptitle("stage time against dataset size (log-log; frozen, efficientnet_lite0, generated images)")
    figure.tight_layout(rect=(0, 0, 0.88, 1))
    picture.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(picture, dpi=100)


def table(results: list[dict], memory: list[tuple[int, float, float]]) -> str:
    stages = list(dict.fromkeys(s for r in results for s in r["full"]))
    requested = list(dict.fromkeys(s for r in results for s in r.get("full_on_request", {})))
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.scale` (one run; generated "
             "images of four shapes in a folder source, 96 px JPEGs; strategy frozen, efficientnet_lite0; each "
             "stage's seconds from DVC starting it to DVC starting the next, its outputs' hashing included; "
             "blank: the stage did not run). The loop is `dvc repro` (dvc.yaml); release and audit, "
             "`dvc repro --all-pipelines` after it.", "",
             "| images | case | loop total | " + " | ".join(stages) + " | release + audit | "
             + " | ".join(requested) + " | md5 of every image |",
             "|---|---|---|" + "---|" * (len(stages) + 1 + len(requested)) + "---|"]
    for r in results:
        for case, label in (("full", "(a) empty cache"), ("more", f"(b) +{r['added']} images"),
                            ("head", "(c) head-only exp")):
            cells = [f"{r[case][s]:.1f}" if s in r[case] else "" for s in stages]
            extra = r.get(f"{case}_on_request", {})
            cells += [f"{sum(extra.values()):.1f}" if extra else ""]
            cells += [f"{extra[s]:.1f}" if s in extra else "" for s in requested]
            lines.append(f"| {r['images']} | {label} | **{r[case + '_seconds']:.1f}** | " + " | ".join(cells)
                         + f" | {r['md5_seconds']:.2f} |")
    last = results[-1]
    everything = last["full_seconds"] + sum(last.get("full_on_request", {}).values())
    lines += ["", f"At {last['images']} images, the loop's (b) takes {last['more_seconds'] / last['full_seconds']:.1%} "
              f"of its (a), and {last['more_seconds'] / everything:.1%} of a full run of every pipeline from an "
              f"empty cache ({everything:.1f} s); release and audit's own (b): "
              f"{sum(last.get('more_on_request', {}).values()):.1f} s.",
              "", "The train stage's peak RSS (a frozen run on cached features; random features written directly):",
              "", "| images | features files | train stage peak RSS | against the smallest |", "|---|---|---|---|"]
    lines += [f"| {n} | {f:.0f} MB | {m:.0f} MB | {m / memory[0][2]:.2f}x |" for n, f, m in memory]
    lines += ["", "With every image: " + ", ".join(f"{r['images']}: {r['train_peak_rss_mb']:.0f} MB" for r in results)
              + " (the train stage after (a), generated images)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--datasets", type=Path, default=Path("..") / "scale_data")
    parser.add_argument("--plot-only", action="store_true", help=f"redraw {PICTURE} from {RAW}")
    parser.add_argument("--memory-only", action="store_true",
                        help=f"measure the peak RSS rows again, keep the times of {RAW}, and republish")
    args = parser.parse_args()
    if args.plot_only:
        draw(json.loads(RAW.read_text())["sizes"], PICTURE)
        return
    if args.memory_only:
        results = json.loads(RAW.read_text())["sizes"]
        memory = memory_rows(args.memory_sizes)
        RAW.write_text(json.dumps({"sizes": results, "memory": memory}, indent=1))
        publish("scale", table(results, memory), RESULTS)
        return
    if subprocess.run(["git", "status", "--porcelain", "--", "params.yaml", "dvc.lock"], capture_output=True,
                      text=True).stdout.strip():
        raise SystemExit("params.yaml or dvc.lock has uncommitted changes; run this in a throwaway clone")
    args.datasets.mkdir(parents=True, exist_ok=True)
    results = [run_size(size, args.datasets) for size in args.sizes]
    memory = memory_rows(args.memory_sizes)
    RAW.write_text(json.dumps({"sizes": results, "memory": memory}, indent=1))
    draw(results, PICTURE)
    publish("scale", table(results, memory), RESULTS)
    print(f"wrote {PICTURE}")


if __name__ == "__main__":
    main()
