"""Summarise a sweep: mean, std, min and max of each test metric over finished experiments: the
command, not a stage.

    python -m stages.sweep [PREFIX ...]     # experiments whose names start with a PREFIX (default: all)

A single run's score moves with its seed as much as with many a setting (docs/experiments.md, Is B better than
A?): run the same settings under several `train.seed` (and `features.seed`) values, then report
the spread, not one number. Reads `dvc exp show --json` (the experiments of the current commit)
and prints a Markdown table, a row per metric of metrics/eval.json; std is the sample standard
deviation (n - 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import pandas as pd

from stages.lib.cli import UserError, run_stage
from stages.lib.paths import EVAL_JSON

log = logging.getLogger("sweep")


def finished_experiments(shown: list[dict]) -> dict[str, dict]:
    """Each named, finished experiment's eval.json metrics, from `dvc exp show --json`."""
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get(EVAL_JSON.as_posix(), {}).get("data")
                name = rev.get("name") or experiment.get("name")
                if name and metrics and not rev.get("error"):
                    found[name] = metrics
    return found


def summary(metrics: dict[str, dict]) -> pd.DataFrame:
    """Per numeric metric: n, mean, std (n - 1), min, max over the experiments."""
    table = pd.DataFrame.from_dict(metrics, orient="index").select_dtypes("number")
    result = pd.DataFrame({"n": table.count(), "mean": table.mean(), "std": table.std(ddof=1), "min": table.min(),
                           "max": table.max()})
    return result.rename_axis("metric").reset_index()


def markdown(table: pd.DataFrame) -> str:
    lines = ["| metric | n | mean | std | min | max |", "|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        std = "-" if pd.isna(row.std) else f"{row.std:.4f}"
        lines.append(f"| {row.metric} | {row.n} | {row.mean:.4f} | {std} | {row.min:.4f} | {row.max:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="experiment name prefixes (default: every experiment)")
    args = parser.parse_args(argv)
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if shown.returncode != 0:
        last = shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else ""
        raise UserError(f"dvc exp show failed ({last}); run from the project's root")
    metrics = {name: values for name, values in finished_experiments(json.loads(shown.stdout)).items()
               if not args.prefixes or name.startswith(tuple(args.prefixes))}
    if not metrics:
        named = " named " + " or ".join(p + "..." for p in args.prefixes) if args.prefixes else ""
        raise UserError(f"no finished experiment{named}; run them first (dvc exp run --queue ..., dvc queue start), "
                        "see dvc exp show")
    print(f"{len(metrics)} experiments: {', '.join(sorted(metrics))}\n")
    print(markdown(summary(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
