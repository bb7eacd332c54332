"""The README's `dvc exp show` output: the three README experiments, queued from the committed
params (so none builds on another), then shown as README suggests, in a 120-column terminal.

    python -m bench.exp_show

Run it in a throwaway clone (git clone, link .venv, `dvc repro`, commit): the experiments are kept
there, and a second run only shows them again. It prints the natural width of the plain
`dvc exp show --only-changed` table too.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.publish import publish

RESULTS = Path("bench/results/exp_show.md")
EXPERIMENTS = {
    "lr-3e-3": ["train.lr=0.003"],
    "finetune-3": ["strategy=finetune", "train.epochs=3"],
    "lite0": ["model.backbone=efficientnet_lite0"],
}
# What a person compares first; README shows patterns for the rest.
DROP = (r"Created|State|Executor|data/.*|models/.*|stages/.*|step|best_epoch|val_.*|loss|.*_low|.*_high|ece_.*|brier"
        r"|balanced_accuracy")
SHOW = ["dvc", "exp", "show", "--only-changed", "--no-pager"]


def shown(*extra: str, columns: int = 120) -> str:
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([*SHOW, *extra], check=True, capture_output=True, text=True, env=env).stdout


def width(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


def main() -> None:
    existing = subprocess.run(["dvc", "exp", "list", "--name-only"], capture_output=True, text=True).stdout.split()
    for name, settings in EXPERIMENTS.items():
        if name in existing:  # from an earlier run of this script: shown again, not rerun
            continue
        subprocess.run(["dvc", "exp", "run", "--queue", "-n", name, *[a for s in settings for a in ("-S", s)]],
                       check=True)
    subprocess.run(["dvc", "queue", "start", "--jobs", "1"], check=True)
    while "Queued" in (status := subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout) \
            or "Running" in status:
        time.sleep(5)
    plain = shown(columns=10000)
    readable = shown("--drop", DROP)
    print(f"plain `dvc exp show --only-changed`: {width(plain)} columns; with --drop: {width(readable)} columns")
    text = "\n".join([
        f"```console\n$ dvc exp show --only-changed --drop '{DROP}'",
        readable.rstrip(),
        "```",
        "",
        f"(Without `--drop` the same table is {width(plain)} columns wide: DVC also lists every dependency "
        "whose hash differs between the rows, and the rest of the metrics.)",
    ])
    publish("exp-show", text, RESULTS)


if __name__ == "__main__":
    main()
