"""Heads on cached features on one torch thread, against torch on every core, in one run.

    python -m bench.head_threads [--archives hymenoptera_data,trashnet,blood_cells] [--synthetic 16000]

Run it in a throwaway clone with its own DVC cache (git clone, link .venv); the archives are
../shared/datasets/*.zip. For each archive, `dvc exp run ... features` makes its cached features
(the default params), then this process trains on them the suspects stage's out-of-fold heads
(lib/folds.py) and the train stage's head (training.fit_head), each twice: as the stages train them,
on one torch thread (training.one_torch_thread), and with torch on every core, as before (that
context made a no-op); and whether both give the same bits. Then the same on random features
with a class signal: N images of two views of 1,280 numbers (Lite0's width) in 4 classes, as
train + val hold at bench.scale's 20,000 images. Writes bench/results/head_threads.md and
docs/speed.md's `head-threads` block.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from datetime import date
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib import training
from stages.lib.classifier import head_config, make_head
from stages.lib.folds import out_of_fold_probabilities
from stages.lib.params import Params, load_params

RESULTS = Path("bench/results/head_threads.md")


def heads(train: dict, val: dict, merged: dict, params: Params, classes: int, one_thread: bool) -> dict:
    """Seconds of the suspects stage's heads and of train's head, and an md5 of what they made."""
    context = training.one_torch_thread if one_thread else contextlib.nullcontext
    digest = hashlib.md5()
    with mock.patch.object(training, "one_torch_thread", context):
        started = time.perf_counter()
        digest.update(out_of_fold_probabilities(merged, params, classes)[0].tobytes())
        suspects = time.perf_counter() - started
        torch.manual_seed(params.train.seed)
        head = make_head(train["features"].shape[-1], classes, **head_config(params.model))
        run = training.make_run(params, torch.device("cpu"), torch.from_numpy(train["labels"]), classes)
        started = time.perf_counter()
        for _ in training.fit_head(head, train, val, run, 1, training.head_settings(params)):
            pass
        train_head = time.perf_counter() - started
    for tensor in head.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    return {"suspects": suspects, "train": train_head, "md5": digest.hexdigest()}


def measure(name: str, train: dict, val: dict, merged: dict, params: Params, classes: int) -> dict:
    every_core = heads(train, val, merged, params, classes, one_thread=False)
    one = heads(train, val, merged, params, classes, one_thread=True)
    row = {"data": name, "images": len(merged["labels"]), "threads": torch.get_num_threads(),
           "suspects_every_core": every_core["suspects"], "suspects_one": one["suspects"],
           "train_every_core": every_core["train"], "train_one": one["train"],
           "same_bits": every_core["md5"] == one["md5"]}
    print(json.dumps(row), flush=True)
    return row


def archive_row(archive: Path) -> dict:
    from stages.lib.features import read_features
    from stages.lib.index_table import read_classes
    from stages.suspects import train_and_val

    run_on_archive(archive, [], ["features"])
    merged, _, _ = train_and_val()
    train, val = read_features("train", in_memory=True), read_features("val", in_memory=True)
    return measure(archive.stem, train, val, merged, load_params(), len(read_classes()))


def synthetic_row(images: int, width: int = 1280, classes: int = 4) -> dict:
    generator = np.random.default_rng(0)
    labels = generator.integers(0, classes, images)
    signal = generator.normal(size=(classes, width)).astype(np.float32) * 0.3
    features = (generator.normal(size=(images, 2, width)).astype(np.float32) + signal[labels][:, None])
    merged = {"features": features, "labels": labels, "views": ["plain", "hflip"]}
    cut = images * 4 // 5
    train = {**merged, "features": features[:cut], "labels": labels[:cut]}
    val = {**merged, "features": features[cut:], "labels": labels[cut:]}
    return measure(f"random, {width} wide", train, val, merged, load_params(), classes)


def table(rows: list[dict]) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.head_threads` (one run; the "
             "default params; seconds of the suspects stage's five out-of-fold heads and of the train stage's head, "
             f"with torch on every core ({rows[0]['threads']} threads) as before, and on one thread as now).", "",
             "| features | images (train + val) | suspects' heads, every core | one thread | ratio | "
             "train's head, every core | one thread | ratio | the same bits both ways |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['images']:,} | {r['suspects_every_core']:.1f} s | {r['suspects_one']:.1f} s | "
              f"**{r['suspects_every_core'] / r['suspects_one']:.2f}x** | {r['train_every_core']:.1f} s | "
              f"{r['train_one']:.1f} s | **{r['train_every_core'] / r['train_one']:.2f}x** | "
              f"{'yes' if r['same_bits'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", default="hymenoptera_data,trashnet,blood_cells")
    parser.add_argument("--synthetic", type=int, default=16000, help="random images (0: none)")
    args = parser.parse_args()
    rows = []
    with restored_workspace():
        for name in filter(None, args.archives.split(",")):
            rows.append(archive_row(SHARED / f"{name}.zip"))
    if args.synthetic:
        rows.append(synthetic_row(args.synthetic))
    publish("head-threads", table(rows), RESULTS)


if __name__ == "__main__":
    main()
