"""The head search (train.head_search) on the archive of params.yaml: its seconds and what it picked.

    python -m bench.head_search

Run it in a throwaway clone whose pipeline is reproduced and committed: it runs
`dvc exp run -S strategy=frozen -S train.head_search=true` in the workspace, reads the search's seconds from
metrics/train/time.json and the settings from metrics/train/head_search.csv, and sets them beside
the committed run without the search. Writes bench/results/head_search.md and README's
`head-search` block, and restores params.yaml, dvc.lock and the outputs afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import date
from pathlib import Path

import pandas as pd

from bench.publish import cpu_name, publish
from bench.workspace import restored_workspace

RESULTS = Path("bench/results/head_search.md")


def read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def run_summary() -> dict:
    chosen = pd.read_csv("metrics/train/head_search.csv").query("chosen == 1").iloc[0]
    return {"eval": read_json("metrics/eval/summary.json"), "time": read_json("metrics/train/time.json"),
            "train": read_json("metrics/train/metrics.json"), "lr": chosen["lr"], "wd": chosen["weight_decay"],
            "settings": len(pd.read_csv("metrics/train/head_search.csv"))}


def main() -> None:
    before = run_summary()
    with restored_workspace():
        started = time.perf_counter()
        subprocess.run(["dvc", "exp", "run", "-S", "strategy=frozen", "-S", "train.head_search=true"], check=True)
        wall = time.perf_counter() - started
        after = run_summary()
    rows = [("without the search (committed)", before, None), ("`-S train.head_search=true`", after, wall)]
    lines = [f"Measured {date.today().isoformat()} on {cpu_name()}, {os.cpu_count()} cores, by "
             "`python -m bench.head_search` (hymenoptera, default params otherwise).", "",
             "| run | settings tried | lr, weight decay trained | search | train stage | `dvc exp run` | best val "
             "accuracy (loss) | test accuracy [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for name, run, seconds in rows:
        lines.append(
            f"| {name} | {run['settings']} | {run['lr']:g}, {run['wd']:g} | {run['time'].get('head_search', 0):.1f} s "
            f"| {run['time']['total']:.1f} s | {f'{seconds:.1f} s' if seconds else '-'} | "
            f"{run['train']['val_accuracy']:.4f} ({run['train']['val_loss']:.4f}) | {run['eval']['accuracy']:.4f} "
            f"[{run['eval']['accuracy_low']:.3f}, {run['eval']['accuracy_high']:.3f}] |")
    publish("head-search", "\n".join(lines), RESULTS)


if __name__ == "__main__":
    main()
