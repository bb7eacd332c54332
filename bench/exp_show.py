"""docs/experiments.md's `dvc exp show` output: three head-only experiments (strategy frozen, a head
setting changed), queued from the committed params (so none builds on another), then shown as
`make exp-show` shows them, in 120 columns; the baseline has run every pipeline (`dvc repro
--all-pipelines`), so its release and audit metrics are committed, and none may show.

    python -m bench.exp_show

Run it in a throwaway clone (git clone, link .venv, `dvc repro`, commit): the experiments are kept
there, and a second run only shows them again. It prints the natural width of the plain
`dvc exp show --only-changed` table too.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from bench.publish import publish

RESULTS = Path("bench/results/exp_show.md")
EXPERIMENTS = {
    "frozen": ["strategy=frozen"],
    "frozen-lr-3e-3": ["strategy=frozen", "train.lr=0.003"],
    "frozen-wd-0.1": ["strategy=frozen", "train.weight_decay=0.1"],
}
# `make exp-show`'s command, as make prints it (the Makefile is the one place it is written): it drops
# when and how an experiment ran, the hashes of the data and models, and the on-demand stages' metrics.
MAKE_EXP_SHOW = shlex.split(next(line for line in subprocess.run(
    ["make", "--no-print-directory", "-n", "exp-show"], capture_output=True, text=True, check=True).stdout.splitlines()
    if "dvc exp show" in line))
VIEW = MAKE_EXP_SHOW[MAKE_EXP_SHOW.index("--only-changed") + 1:]
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
    fitted = shown(columns=160)
    readable = shown(*VIEW)
    header = readable.splitlines()[1]
    accuracy_shown = " accuracy " in header
    on_request_shown = bool({"int8", "md5", "mislabelled"} & set(header.split()))
    print(f"plain `dvc exp show --only-changed`: {width(plain)} columns unconstrained, {width(fitted)} in a "
          f"160-column terminal; with --drop: {width(readable)} columns; test accuracy shown: {accuracy_shown}; "
          f"the changed params shown: {'train.lr' in header and 'strategy' in header}; release or audit metrics "
          f"shown: {on_request_shown}")
    text = "\n".join([
        "```console\n$ make exp-show",
        readable.rstrip(),
        "```",
        "",
        f"`make exp-show` is `dvc exp show --only-changed {shlex.join(VIEW)}`. "
        f"Plain `dvc exp show --only-changed` adds the hashes of the data and models that differ between the "
        f"rows: {width(plain)} columns unconstrained; in a 160-column terminal DVC folds those into `…` "
        f"({width(fitted)} columns, every metric and param above still shown).",
    ])
    publish("exp-show", text, RESULTS)


if __name__ == "__main__":
    main()
