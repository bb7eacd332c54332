"""A head-only experiment against an experiment with nothing to rerun, in one run on one machine.

    python -m bench.head_only

Run it in a throwaway clone whose pipeline is reproduced (`dvc repro`) and committed. Every
experiment is head-only: strategy frozen and a new train.lr (under the default, auto, a new
train.lr retrains the network phase too). It measures, each the median of three:
1. `python -c "import torch"`, the floor of every stage that imports torch;
2. `dvc exp run -S strategy=frozen` when the workspace is already that experiment: only the check
   stage runs;
3. `dvc exp run -S strategy=frozen -S train.lr=X`: the experiment loop (dvc.yaml) runs check,
   train and evaluate; shipping and audits are other pipeline files, run on request;
4. each of those stages as its own process (`python -m stages NAME`), as DVC starts it.
The target is 3 <= 2 x 3. Writes bench/results/head_only.md and docs/speed.md's `head-only`
block, and restores params.yaml, the lock files and the outputs afterwards.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

from bench.publish import machine, publish
from bench.workspace import restored_workspace, timed

RESULTS = Path("bench/results/head_only.md")
STAGES = ("check", "train", "evaluate")
FROZEN = ["-S", "strategy=frozen"]
TARGET = 3.0


def median_of(runs: list[float]) -> str:
    return f"**{statistics.median(runs):.2f} s** ({', '.join(f'{v:.2f}' for v in runs)})"


def experiment(lr: float | None) -> tuple[float, list[str]]:
    seconds, output = timed(["dvc", "exp", "run", *FROZEN, *(["-S", f"train.lr={lr:g}"] if lr else [])])
    ran = re.findall(r"Running stage '(\w+)'", output)
    print(f"dvc exp run {'-S train.lr=' + format(lr, 'g') if lr else '(nothing to rerun)'}: {seconds:.2f} s, "
          f"ran {', '.join(ran)}", flush=True)
    return seconds, ran


def stage_seconds() -> dict[str, float]:
    """Each stage of the last head-only experiment again, as its own process."""
    return {stage: timed([sys.executable, "-m", "stages", stage])[0] for stage in STAGES}


def table(torch_import: list[float], noop: list[float], head_only: list[float], stages: dict[str, float],
          ran: list[str], accuracy: float) -> str:
    ratio = statistics.median(head_only) / statistics.median(noop)
    rows = [("`python -c \"import torch\"`", median_of(torch_import)),
            ("`dvc exp run`, nothing to rerun (the check stage runs)", median_of(noop)),
            (f"`dvc exp run -S train.lr=X`, three X (ran {', '.join(ran)})", median_of(head_only)),
            ("the head-only experiment / the one with nothing to rerun",
             f"**{ratio:.2f}x** (target <= {TARGET:g}x: {'met' if ratio <= TARGET else 'NOT met'})")]
    rows += [(f"`python -m stages {stage}` alone", f"{seconds:.2f} s") for stage, seconds in stages.items()]
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.head_only` (one run; "
             f"hymenoptera, strategy frozen, every experiment a new train.lr; test accuracy {accuracy:.4f}).", "",
             "| | seconds |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])


def main() -> None:
    status = subprocess.run(["git", "status", "--porcelain", "--", "params.yaml", "dvc.lock"], capture_output=True,
                            text=True).stdout
    if status.strip():
        raise SystemExit("params.yaml or dvc.lock has uncommitted changes; commit them first: the bench runs "
                         "experiments in the workspace and restores it afterwards")
    with restored_workspace():
        torch_import = [timed([sys.executable, "-c", "import torch"])[0] for _ in range(3)]
        experiment(None)  # the workspace becomes the frozen experiment
        noop, head_only, ran = [], [], []
        for lr in (0.00153, 0.00171, 0.00189):
            noop.append(experiment(None)[0])
            seconds, ran = experiment(lr)
            head_only.append(seconds)
        accuracy = json.loads(Path("metrics/eval.json").read_text())["accuracy"]
        stages = stage_seconds()
    publish("head-only", table(torch_import, noop, head_only, stages, ran, accuracy), RESULTS)


if __name__ == "__main__":
    main()
