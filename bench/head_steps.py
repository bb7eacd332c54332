"""The head's step cap (train.head_max_steps) where it bites, on the archives, in one run.

    python -m bench.head_steps [--archives trashnet,blood_cells] [--caps 2500,5000,10000,1000000] [--views 8]

Run it in a throwaway clone with its own DVC cache (git clone, link .venv); the archives are
../shared/datasets/*.zip. With the defaults no archive reaches the cap (at most 95 steps an epoch,
30 epochs); with `features.views` augmented views per training image an epoch has (2 + views)
vectors per image, so the cap decides the head's length as it would on a dataset that many times
larger. For each archive and cap, `dvc exp run -S strategy=frozen -S features.views=V -S
train.head_max_steps=CAP evaluate`: the epochs and steps the head trained, its seconds
(metrics/train/time.json), its best val accuracy and the test accuracy and macro-F1. 1,000,000 is
no cap: the 30 epochs of train.head_epochs. Writes bench/results/head_steps.md and
docs/scaling.md's `head-steps` block.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from datetime import date
from pathlib import Path

import pandas as pd
import yaml

from bench.defaults import SHARED, read_json
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive

RESULTS = Path("bench/results/head_steps.md")


def measure(archive: Path, views: int, cap: int) -> dict:
    subprocess.run(["git", "checkout", "--", "params.yaml"], check=True)  # each run from the committed params
    run_on_archive(archive, ["strategy=frozen", f"features.views={views}", f"train.head_max_steps={cap}"],
                   ["evaluate"])
    images = int((pd.read_csv("data/index.csv")["split"] == "train").sum())
    epochs = len(Path("metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()) - 1
    batch = yaml.safe_load(Path("params.yaml").read_text())["train"]["head_batch_size"]  # as the run applied it
    evaluation = read_json("metrics/eval.json")
    row = {"archive": archive.stem, "cap": cap, "epochs": epochs,
           "steps": epochs * math.ceil(images * (2 + views) / batch),
           "head_s": read_json("metrics/train/time.json")["head"],
           "val": read_json("metrics/train.json")["val_accuracy"],
           "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], views: int) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.head_steps` (strategy frozen, "
             f"`features.views={views}`: {2 + views} vectors per training image, the default params otherwise; "
             "1,000,000 is no cap).", "",
             "| archive | `train.head_max_steps` | head epochs | head steps | head seconds | best val accuracy | "
             "test accuracy | macro-F1 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['archive']} | {r['cap']:,} | {r['epochs']} | {r['steps']:,} | {r['head_s']:.1f} | "
              f"{r['val']:.4f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", default="trashnet,blood_cells")
    parser.add_argument("--caps", default="2500,5000,10000,1000000")
    parser.add_argument("--views", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with restored_workspace():
        for name in args.archives.split(","):
            for cap in (int(c) for c in args.caps.split(",")):
                rows.append(measure(SHARED / f"{name}.zip", args.views, cap))
    publish("head-steps", table(rows, args.views), RESULTS)


if __name__ == "__main__":
    main()
