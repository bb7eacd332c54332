"""`python -m stages NAME`: run one stage, as dvc.yaml does; `python -m stages.NAME` is the same.

dvc.yaml runs `python` from the PATH. When that python lacks the project's packages (dvc run as
`.venv/bin/dvc` without activating the venv), the stage runs under the project's own
`.venv/bin/python` if there is one, and otherwise stops with one line saying what to do. A python
with torch, the common case, runs the stage in this very process.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

STAGES = ("check", "download", "index", "weights", "features", "leaks", "suspects", "train", "evaluate",
          "heatmaps", "export_backbone", "export", "latency")
PROJECT_VENV_PYTHON = Path(".venv/bin/python")
REEXEC_MARK = "DVC_TRANSFER_REEXEC"  # set once run under the venv, so it happens at most once


def ensure_project_python() -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    venv = PROJECT_VENV_PYTHON.absolute()
    if not venv.is_file() or os.environ.get(REEXEC_MARK):
        raise SystemExit(f"error: {sys.executable} has no torch; activate the project's environment first "
                         "(source .venv/bin/activate, set up by make run) or run through make (make repro)")
    os.environ[REEXEC_MARK] = "1"
    os.execv(venv, [str(venv), "-m", "stages", *sys.argv[1:]])


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m stages {{{','.join(STAGES)}}}")
    ensure_project_python()
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    from stages.lib.cli import run_stage

    run_stage(stage.main)


if __name__ == "__main__":
    main()
