"""The README's calibration figures: the default pipeline on each real dataset, its test ECE
without and with the temperature fitted on val, NLL and Brier score, and its accuracy interval.

    python -m bench.calibration [--datasets ../shared/datasets] [-S strategy=finetune ...]

Run it in a throwaway clone (git clone, then link .venv): each dataset is a `dvc exp run` in the
workspace with `data.url` pointing at its archive; metrics/eval/summary.json is read back; params.yaml,
dvc.lock and the outputs are restored at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from bench.publish import publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib.checkpoint import read_checkpoint
from stages.lib.params import load_params
from stages.lib.paths import EVAL_SUMMARY, MODEL

RESULTS = Path("bench/results/calibration.md")
DATASETS = ("hymenoptera_data.zip", "trashnet.zip", "blood_cells.zip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("-S", dest="settings", action="append", default=[], help="extra params, as dvc exp run -S")
    args = parser.parse_args()
    params = load_params()
    rows = []
    with restored_workspace():
        for name in DATASETS:
            seconds = run_on_archive(args.datasets / name, args.settings)
            m = json.loads(EVAL_SUMMARY.read_text())
            temperature = read_checkpoint(MODEL).temperature
            rows.append(f"| {name} | {m['images']} | {m['accuracy']:.4f} [{m['accuracy_low']:.3f}, "
                        f"{m['accuracy_high']:.3f}] | {temperature:.3g} | {m['ece_uncalibrated']:.4f} | "
                        f"{m['ece']:.4f} | {m['loss']:.4f} | {m['brier']:.4f} | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    settings = ", ".join(f"`{s}`" for s in args.settings) or "none"
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads: the pipeline with "
        f"params.yaml's defaults (strategy `{params.strategy}`, backbone `{params.model.backbone}`; changed: "
        f"{settings}) on each archive (`python -m bench.calibration`):",
        "",
        "| archive | test images | test accuracy [95% CI] | temperature | ECE without | ECE with | NLL | Brier | "
        "experiment wall time |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    publish("calibration", table, RESULTS)


if __name__ == "__main__":
    main()
