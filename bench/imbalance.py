"""The README's imbalance table: TrashNet (trash 137 images, paper 594) with each
`train.class_weighting`, strategy frozen, every other param as in params.yaml.

    python -m bench.imbalance [--archive ../shared/datasets/trashnet.zip]

Run it in a throwaway clone (git clone, then link .venv). Each row is a DVC experiment in the
workspace with `data.url` pointing at the archive: the first one runs download, index and
features on it, the others only train and evaluate. Test metrics and the smallest class's recall
are read from metrics/eval/summary.json and metrics/eval/per_class.csv; params.yaml, dvc.lock and the
outputs are restored at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import pandas as pd
import torch

from bench.publish import publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib.params import load_params
from stages.lib.paths import DATA_SUMMARY, EVAL_SUMMARY, PER_CLASS_CSV

RESULTS = Path("bench/results/imbalance.md")
SETTINGS = [("none", "accuracy"), ("balanced", "accuracy"), ("sampler", "accuracy"), ("balanced", "macro_f1"),
            ("sampler", "macro_f1")]


def run_experiment(archive: Path, weighting: str, select_on: str) -> tuple[dict, dict, pd.DataFrame, float]:
    seconds = run_on_archive(archive, ["strategy=frozen", f"train.class_weighting={weighting}",
                                       f"train.select_on={select_on}"])
    return (json.loads(EVAL_SUMMARY.read_text()), json.loads(DATA_SUMMARY.read_text()),
            pd.read_csv(PER_CLASS_CSV).set_index("class"), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=Path("../shared/datasets/trashnet.zip"))
    args = parser.parse_args()
    params = load_params()
    rows = []
    with restored_workspace():
        for weighting, select_on in SETTINGS:
            scores, data, per_class, seconds = run_experiment(args.archive, weighting, select_on)
            totals = {name: sum(data["counts"][split][name] for split in ("train", "val", "test"))
                      for name in per_class.index}
            smallest = min(totals, key=totals.get)
            rows.append(f"| {weighting} | {select_on} | {scores['accuracy']:.4f} | {scores['balanced_accuracy']:.4f} | "
                        f"{scores['macro_f1']:.4f} | {per_class.loc[smallest, 'recall']:.3f} ({smallest}, "
                        f"{per_class.loc[smallest, 'support']} test images) | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    metrics = {"data": data}
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads: "
        f"`{args.archive.name}`, {metrics['data']['images']} images in {metrics['data']['classes']} classes "
        f"(largest over smallest {metrics['data']['imbalance_ratio']}x), flat 60/20/20 split, strategy frozen, "
        f"backbone `{params.model.backbone}`, other params as in params.yaml (`python -m bench.imbalance`):",
        "",
        "| train.class_weighting | train.select_on | test accuracy | balanced accuracy | macro-F1 | "
        "smallest class's recall | experiment wall time |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    publish("imbalance", table, RESULTS)


if __name__ == "__main__":
    main()
