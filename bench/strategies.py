"""The README's results table: each strategy as a DVC experiment on the current data.

    python -m bench.strategies [--strategies frozen finetune scratch]

Each strategy runs as `dvc exp run --temp -f -s -S strategy=NAME check_params train evaluate`: the workspace is
left alone, the data stages and features come from the cache, and train and evaluate are forced
to run (DVC's run cache would otherwise restore a result computed before, in no time). The
features stage, shared by frozen and finetune, is timed once on its own. Test metrics are read
back from `dvc exp show --json`.
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

RESULTS = Path("bench/results/strategies.md")


def run_experiment(stages: list[str], *settings: str) -> tuple[str, float]:
    """Force `stages` to run in a temporary experiment; returns its name and wall time."""
    name = f"bench-{'-'.join(stages)}-{int(time.time())}"
    overrides = [arg for setting in settings for arg in ("-S", setting)]
    started = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", "--temp", "-f", "-s", "-n", name, *overrides, *stages], check=True)
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
    parser.add_argument("--strategies", nargs="+", default=["frozen", "finetune", "scratch"])
    args = parser.parse_args()
    params = load_params()
    rows = []
    _, feature_seconds = run_experiment(["check_params", "features"])
    for strategy in args.strategies:
        name, seconds = run_experiment(["check_params", "train", "evaluate"], f"strategy={strategy}")
        metrics = experiment_metrics(name)
        rows.append(f"| {strategy} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['best_epoch']} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"backbone `{params.model.backbone}`, other params as in params.yaml, test split of "
        f"{metrics['images']} images (`python -m bench.strategies`):",
        "",
        "| strategy | test accuracy | test macro-F1 | best epoch | train + evaluate wall time |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"The features stage, which frozen and finetune train their head on, took {feature_seconds:.0f} s "
        f"({params.features.views} augmented views per training image); `dvc exp run` reuses it from the cache.",
    ])
    publish("strategies", table, RESULTS)


if __name__ == "__main__":
    main()
