"""Is B better than A? Compare two runs' test predictions image by image: the command, not a stage.

    python -m stages.compare [A] [B]      # default: HEAD against the workspace

A and B are git revisions or branches, DVC experiment names (as `dvc exp show` lists them), or
`workspace`. Each run's committed metrics/predictions.csv is read (git show, so nothing is
checked out); the runs must have scored the same test images with the same labels. It prints the
per-image agreement table, McNemar's exact test on the images only one of the two got right, a
paired bootstrap interval of the accuracy difference, and a one-line verdict such as
`B - A = +0.65 points, 95% CI [-1.3, +2.6], p = 1.0: no evidence of a difference`.
"""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd

from stages.lib.cli import UserError, run_stage
from stages.lib.files import read_csv
from stages.lib.paths import PREDICTIONS_CSV
from stages.lib.significance import RESAMPLES, mcnemar_exact, paired_bootstrap_difference

log = logging.getLogger("compare")

WORKSPACE = "workspace"
LEVEL = 0.05  # the verdict's significance level, and 1 - the interval's coverage


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def experiment_ref(name: str) -> str | None:
    """The git ref DVC keeps an experiment under (refs/exps/.../NAME), if there is one by that name."""
    refs = git("for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    matches = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    return matches[0] if len(matches) == 1 else None


def read_predictions(run: str) -> pd.DataFrame:
    if run == WORKSPACE:
        if not PREDICTIONS_CSV.is_file():
            raise UserError(f"{PREDICTIONS_CSV}: not found in the workspace; run the pipeline (dvc repro)")
        return read_csv(PREDICTIONS_CSV)
    rev = run if git("rev-parse", "--verify", "--quiet", f"{run}^{{commit}}").returncode == 0 else experiment_ref(run)
    if rev is None:
        raise UserError(f"{run}: neither a git revision nor a DVC experiment; give a commit, branch, tag, "
                        f"experiment name (dvc exp show) or {WORKSPACE}")
    shown = git("show", f"{rev}:{PREDICTIONS_CSV.as_posix()}")
    if shown.returncode != 0:
        raise UserError(f"{run}: has no committed {PREDICTIONS_CSV}; commit the pipeline's results there first")
    return read_csv(io.StringIO(shown.stdout))


def paired_outcomes(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Per test image: whether A and B got it right; refuses runs scored on different images."""
    only_a, only_b = set(a["path"]) - set(b["path"]), set(b["path"]) - set(a["path"])
    if only_a or only_b:
        raise UserError(f"{names[0]} and {names[1]} were evaluated on different test images ({len(only_a)} only in "
                        f"{names[0]}, {len(only_b)} only in {names[1]}); compare runs that share the test split")
    joined = a[["path", "true", "predicted"]].merge(b[["path", "true", "predicted"]], on="path", suffixes=("_a", "_b"))
    relabelled = joined[joined["true_a"] != joined["true_b"]]
    if len(relabelled):
        raise UserError(f"{names[0]} and {names[1]} give different true labels to {len(relabelled)} test images "
                        f"(e.g. {relabelled['path'].iloc[0]}); compare runs that share the test split")
    return pd.DataFrame({"path": joined["path"], "a": joined["predicted_a"] == joined["true_a"],
                         "b": joined["predicted_b"] == joined["true_b"]})


def comparison(outcomes: pd.DataFrame) -> dict:
    a, b = outcomes["a"].to_numpy(), outcomes["b"].to_numpy()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    low, high = paired_bootstrap_difference(a, b, level=1 - LEVEL)
    return {"images": len(a), "both": int((a & b).sum()), "only_a": only_a, "only_b": only_b,
            "neither": int((~a & ~b).sum()), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "difference": float(b.mean() - a.mean()), "low": low, "high": high, "p": mcnemar_exact(only_a, only_b)}


def verdict(result: dict) -> str:
    if result["p"] < LEVEL and result["low"] > 0:
        finding = "B is better"
    elif result["p"] < LEVEL and result["high"] < 0:
        finding = "B is worse"
    else:
        finding = "no evidence of a difference"
    return (f"B - A = {100 * result['difference']:+.2f} points, 95% CI [{100 * result['low']:+.1f}, "
            f"{100 * result['high']:+.1f}], p = {result['p']:.2g}: {finding}")


def report(result: dict, names: tuple[str, str]) -> str:
    width = 9
    return "\n".join([
        f"A = {names[0]}: accuracy {result['accuracy_a']:.4f}",
        f"B = {names[1]}: accuracy {result['accuracy_b']:.4f}",
        f"on the same {result['images']} test images:",
        "",
        f"{'':<{width}}{'B right':>9}{'B wrong':>9}",
        f"{'A right':<{width}}{result['both']:>9}{result['only_a']:>9}",
        f"{'A wrong':<{width}}{result['only_b']:>9}{result['neither']:>9}",
        "",
        f"McNemar's exact test on the {result['only_a'] + result['only_b']} images only one got right "
        f"({result['only_a']} only A, {result['only_b']} only B): p = {result['p']:.3g}",
        f"paired bootstrap of the accuracy difference ({RESAMPLES} resamples of the test images): "
        f"95% CI [{100 * result['low']:+.2f}, {100 * result['high']:+.2f}] points",
        verdict(result),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="?", default="HEAD", help="the baseline run (default: %(default)s)")
    parser.add_argument("b", nargs="?", default=WORKSPACE, help="the run compared with it (default: %(default)s)")
    args = parser.parse_args(argv)
    if not Path(".git").exists() and (args.a != WORKSPACE or args.b != WORKSPACE):
        raise UserError("not in a git repository; run from the project's root")
    names = (args.a, args.b)
    outcomes = paired_outcomes(read_predictions(args.a), read_predictions(args.b), names)
    print(report(comparison(outcomes), names))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
