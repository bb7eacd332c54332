"""The README's imbalance table: TrashNet (trash 137 images, paper 594) with each
`train.class_weighting`, strategy frozen, every other param as in params.yaml.

    python -m bench.imbalance [--archive ../shared/datasets/trashnet.zip]

Each row is a temporary DVC experiment (`dvc exp run --temp`) on this workspace's pipeline with
`data.url` pointing at the archive: the first one runs download, index and features on it, the
others take those from DVC's run cache and run only train and evaluate. Test metrics and the
smallest class's recall are read back from `dvc exp show --json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from bench.readme_table import publish
from stages.lib.params import load_params

RESULTS = Path("bench/results/imbalance.md")
SETTINGS = [("none", "accuracy"), ("balanced", "accuracy"), ("sampler", "accuracy"), ("balanced", "macro_f1"),
            ("sampler", "macro_f1")]


def run_experiment(archive: Path, weighting: str, select_on: str) -> tuple[dict, float]:
    name = f"imbalance-{weighting}-{select_on.replace('_', '')}-{int(time.time())}"
    settings = [f"data.url={archive.resolve()}", "data.sha256=null", "strategy=frozen",
                f"train.class_weighting={weighting}", f"train.select_on={select_on}"]
    started = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *[a for s in settings for a in ("-S", s)]], check=True)
    seconds = time.perf_counter() - started
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if exp.get("name") == name:
                metrics = exp["revs"][0]["data"]["metrics"]
                return {"eval": metrics["metrics/eval.json"]["data"], "data": metrics["metrics/data.json"]["data"]}, seconds
    raise SystemExit(f"experiment {name} not found in `dvc exp show`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=Path("../shared/datasets/trashnet.zip"))
    args = parser.parse_args()
    params = load_params()
    rows = []
    for weighting, select_on in SETTINGS:
        metrics, seconds = run_experiment(args.archive, weighting, select_on)
        totals = {name: sum(metrics["data"]["counts"][split][name] for split in ("train", "val", "test"))
                  for name in metrics["eval"]["per_class"]}
        smallest = min(totals, key=totals.get)
        scores = metrics["eval"]
        rows.append(f"| {weighting} | {select_on} | {scores['accuracy']:.4f} | {scores['balanced_accuracy']:.4f} | "
                    f"{scores['macro_f1']:.4f} | {scores['per_class'][smallest]['recall']:.3f} ({smallest}, "
                    f"{scores['per_class'][smallest]['support']} test images) | {seconds:.0f} s |")
        print(rows[-1], flush=True)
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
