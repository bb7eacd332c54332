"""`python -m stages NAME`: run one stage, as dvc.yaml does (`python -m stages.NAME` works too).

dvc.yaml runs `python` from the PATH. When that python lacks the project's packages (dvc run as
`.venv/bin/dvc` without activating the venv), the stage is run again by the project's own
`.venv/bin/python` if there is one, and otherwise stops with one line saying what to do.

A stage is a short-lived process whose imports (torch, and timm, pandas, matplotlib, ...) create
about a million Python objects, none of them garbage. Letting the cyclic garbage collector scan
them while importing, and once more at exit, costs about 0.7 s per stage on 2 cores; so collection
waits until the imports are done, and what they made is moved out of its reach (gc.freeze).
"""

import gc
import importlib
import importlib.util
import os
import sys
from pathlib import Path

STAGES = ("check_params", "source", "download", "index", "weights", "features", "leaks", "train", "evaluate",
          "export_backbone", "export")
PROJECT_VENV_PYTHON = Path(".venv/bin/python")
REEXEC_MARK = "DVC_TRANSFER_REEXEC"  # set once re-run under the venv, so it happens at most once


def ensure_project_python() -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    venv = PROJECT_VENV_PYTHON.absolute()
    if venv.is_file() and not os.environ.get(REEXEC_MARK):
        os.environ[REEXEC_MARK] = "1"
        os.execv(str(venv), [str(venv), "-m", "stages", *sys.argv[1:]])
    raise SystemExit(f"error: {sys.executable} has no torch; activate the project's environment first "
                     "(source .venv/bin/activate, set up by make run) or run through make (make repro)")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m stages {{{','.join(STAGES)}}}")
    ensure_project_python()
    gc.disable()
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    gc.freeze()
    gc.enable()
    from stages.lib.cli import run_stage
    run_stage(stage.main)


if __name__ == "__main__":
    main()
