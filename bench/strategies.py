"""The README's results table: each strategy as DVC experiments on the current data, under five
values of `train.seed`, reported as mean and standard deviation (stages/sweep.py's summary).

    python -m bench.strategies [--strategies frozen finetune scratch] [--seeds 5]

Each strategy runs as `dvc exp run --temp -f -s -S strategy=NAME check train evaluate`: the workspace is
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

from bench.publish import publish
from stages.lib.params import load_params
from stages.sweep import summary

RESULTS = Path("bench/results/strategies.md")


def run_experiment(stages: list[str], *settings: str) -> tuple[str, float]:
    """Force `stages` to run in a temporary experiment; returns its name and wall time."""
    name = f"bench-{'-'.join(stages)}-{int(time.time())}"
    overrides = [arg for setting in settings for arg in ("-S", setting)]
    started = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", "--temp", "-f", "-s", "-n", name, *overrides, *stages], check=True)
    return name, time.perf_counter() - started


def experiment_metrics(name: str, path: str = "metrics/eval.json") -> dict:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    shown = json.loads(shown)
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if exp.get("name") == name:
                revs = exp["revs"][0]["data"]
                return revs["metrics"][path]["data"]
    raise SystemExit(f"experiment {name} not found in `dvc exp show`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["frozen", "finetune", "scratch"])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    params = load_params()
    rows = []
    _, feature_seconds = run_experiment(["check", "features"])
    for strategy in args.strategies:
        runs, train_runs, seconds = {}, {}, []
        for seed in range(args.seeds):
            name, took = run_experiment(["check", "train", "evaluate"], f"strategy={strategy}",
                                        f"train.seed={seed}")
            runs[name], seconds = experiment_metrics(name), seconds + [took]
            train_runs[name] = experiment_metrics(name, "metrics/train/metrics.json")
            print(strategy, seed, runs[name]["accuracy"], f"{took:.0f} s", flush=True)
        stats = summary(runs).set_index("metric")
        epochs = sorted(int(m["best_epoch"]) for m in train_runs.values())
        cell = lambda metric, stats=stats: f"{stats.loc[metric, 'mean']:.4f} ± {stats.loc[metric, 'std']:.4f}"  # noqa: E731
        rows.append(f"| {strategy} | {cell('accuracy')} | {stats.loc['accuracy', 'min']:.4f} to "
                    f"{stats.loc['accuracy', 'max']:.4f} | {cell('macro_f1')} | {cell('ece')} | {epochs[0]} to "
                    f"{epochs[-1]} | {sum(seconds) / len(seconds):.0f} s |")
        print(rows[-1], flush=True)
    images = json.loads(Path("metrics/eval/summary.json").read_text())["images"]
    table = "\n".join([
        f"Measured {date.today()} on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"backbone `{params.model.backbone}`, other params as in params.yaml, test split of "
        f"{images} images, {args.seeds} runs per strategy with `train.seed` 0 to {args.seeds - 1} "
        "(`python -m bench.strategies`; mean ± sample standard deviation):",
        "",
        "| strategy | test accuracy | its range | test macro-F1 | test ECE | best epochs "
        "| train + evaluate wall time (mean) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The features stage, which frozen and finetune train their head on, took {feature_seconds:.0f} s "
        f"({params.features.views} augmented views per training image); `dvc exp run` reuses it from the cache.",
    ])
    publish("strategies", table, RESULTS)


if __name__ == "__main__":
    main()
