"""The README's results table: each strategy as a DVC experiment on the current data.

    python -m bench.strategies [--strategies frozen gradual finetune scratch]

Each strategy runs as `dvc exp run --temp -S strategy=NAME` (the workspace is left alone), from
cached data stages: the wall time is what a user waits for that experiment, features included
when they are not cached yet. Test metrics are read back from `dvc exp show --json`.
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

from bench.readme_table import replace_block
from stages.params import load_params

RESULTS = Path("bench/results/strategies.md")


def run_experiment(strategy: str) -> tuple[str, float]:
    name = f"bench-{strategy}-{int(time.time())}"
    started = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, "-S", f"strategy={strategy}"], check=True)
    return name, time.perf_counter() - started


def experiment_metrics(name: str) -> dict:
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if exp.get("name") == name:
                revs = exp["revs"][0]["data"]
                return revs["metrics"]["metrics/eval.json"]["data"]
    raise SystemExit(f"experiment {name} not found in `dvc exp show`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["frozen", "gradual", "finetune", "scratch"])
    args = parser.parse_args()
    params = load_params()
    rows = []
    for strategy in args.strategies:
        name, seconds = run_experiment(strategy)
        metrics = experiment_metrics(name)
        rows.append(f"| {strategy} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['best_epoch']} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"backbone `{params.model.backbone}`, other params as in params.yaml, test split of "
        f"{metrics['images']} images (`python -m bench.strategies`):",
        "",
        "| strategy | test accuracy | test macro-F1 | best epoch | `dvc exp run` wall time |",
        "|---|---|---|---|---|",
        *rows,
    ])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n", encoding="utf-8")
    replace_block("strategies", table)
    print(f"wrote {RESULTS} and README.md")


if __name__ == "__main__":
    main()
