"""The README's near-duplicate figures: the leaks stage on hymenoptera, TrashNet and blood cells
with the default features and `leaks.threshold`.

    python -m bench.leaks [--datasets ../shared/datasets]

Run it in a throwaway clone (git clone, then link .venv): each dataset is a `dvc exp run leaks`
in the workspace with `data.url` pointing at its archive (only the stages up to leaks run), and
its metrics/leaks/summary.json and metrics/leaks.csv are read back; params.yaml, dvc.lock and the
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
from stages.lib.paths import DATA_SUMMARY, LEAK_PAIRS_CSV, LEAKS_SUMMARY

RESULTS = Path("bench/results/leaks.md")
DATASETS = ("hymenoptera_data.zip", "trashnet.zip", "blood_cells.zip")


def run_leaks(archive: Path) -> tuple[dict, dict, pd.DataFrame, float]:
    seconds = run_on_archive(archive, targets=["leaks"])
    return (json.loads(LEAKS_SUMMARY.read_text()), json.loads(DATA_SUMMARY.read_text()), pd.read_csv(LEAK_PAIRS_CSV),
            seconds)


def row(name: str, leaks: dict, data: dict, pairs: pd.DataFrame, seconds: float) -> str:
    spread = f"{pairs.similarity.min():.2f} to {pairs.similarity.max():.2f}" if len(pairs) else "-"
    top = "; ".join(f"{r.similarity:.3f} {r.path_a.split('/')[-1]} ({r.split_a}) ~ {r.path_b.split('/')[-1]} "
                    f"({r.split_b})" for r in pairs.head(2).itertuples()) or "-"
    return (f"| {name} | {data['images']} | {leaks['near_duplicates']} | {leaks['images_in_pairs']['test']} of "
            f"{data['counts']['test']['total']} | {spread} | {top} | {seconds:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    args = parser.parse_args()
    params = load_params()
    rows = []
    with restored_workspace():
        for name in DATASETS:
            rows.append(row(name, *run_leaks(args.datasets / name)))
            print(rows[-1], flush=True)
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads: the leaks stage "
        f"with backbone `{params.model.backbone}`, `leaks.threshold` {params.leaks.threshold}, flat 60/20/20 split "
        "for TrashNet and blood cells, the archive's own for hymenoptera (`python -m bench.leaks`; the time is the "
        "whole `dvc exp run leaks`, download and features included):",
        "",
        "| archive | images | cross-split pairs | test images in a pair | similarity of the pairs | most similar | "
        "time |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    publish("leaks", table, RESULTS)


if __name__ == "__main__":
    main()
