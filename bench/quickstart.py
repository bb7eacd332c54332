"""README's two commands in a fresh clone, timed: what a new user waits for.

    python -m bench.quickstart [--keep]

Clones this repository's HEAD into a temporary folder and runs, one after the other, the venv
set-up and install (the `.venv/.installed` target both commands start with), `make run` (the
pipeline from an empty cache) and `make test` (ruff and the whole suite), then measures the
`.venv`. Writes bench/results/quickstart.md and README's `quickstart` block.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from datetime import date
from pathlib import Path

from bench.publish import machine, publish
from bench.workspace import timed

RESULTS = Path("bench/results/quickstart.md")


def size_mb(folder: Path) -> float:
    return int(subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True).stdout.split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="quickstart-"))
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", str(Path.cwd()), str(clone)], check=True)
    install, _ = timed(["make", ".venv/.installed"], clone)
    run, _ = timed(["make", "run"], clone)
    test, test_output = timed(["make", "test"], clone)
    venv = size_mb(clone / ".venv")
    torch_parts = sum(size_mb(p) for p in (clone / ".venv/lib").glob("python*/site-packages/*")
                      if re.fullmatch(r"torch|nvidia|triton|cuda|cuda_\w+", p.name))
    accuracy = json.loads((clone / "metrics/eval.json").read_text())["accuracy"]
    summary = [line for line in test_output.splitlines() if re.search(r"\d+ passed", line)]
    table = "\n".join([
        f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.quickstart` (one run, a fresh clone).",
        "",
        "| step | time |",
        "|---|---|",
        f"| set up `.venv` and install (the first step of both commands) | {install:.0f} s |",
        f"| `make run`: the pipeline from an empty cache | {run:.0f} s (test accuracy {accuracy:.4f}) |",
        f"| `make test`: ruff and the whole suite | {test:.0f} s ({summary[-1].strip('= ') if summary else '?'}) |",
        f"| the `.venv` | {venv / 1024:.1f} GB, {torch_parts / 1024:.1f} GB of it torch, its NVIDIA libraries "
        "and triton |",
    ])
    publish("quickstart", table, RESULTS)
    if args.keep:
        print(f"kept {clone}")
    else:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
