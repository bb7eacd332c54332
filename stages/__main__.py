"""`python -m stages NAME`: run one stage, as dvc.yaml does (`python -m stages.NAME` works too).

dvc.yaml runs `python` from the PATH. When that python lacks the project's packages (dvc run as
`.venv/bin/dvc` without activating the venv), the stage is run again by the project's own
`.venv/bin/python` if there is one, and otherwise stops with one line saying what to do. It is
also re-run when PYTHONHASHSEED is not 0, so that outputs do not depend on Python's per-process
string hashing (lib/warm.py).

The stage runs in a warm process when a warm server is up (lib/warm.py: the libraries already
imported, which saves 2-5 s per stage), and otherwise here, after which it starts that server.

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

from stages.lib import warm  # the standard library only: cheap before the re-run below

STAGES = ("check_params", "source", "download", "index", "weights", "features", "leaks", "train", "evaluate",
          "export_backbone", "export")
PROJECT_VENV_PYTHON = Path(".venv/bin/python")
REEXEC_MARK = "DVC_TRANSFER_REEXEC"  # set once re-run under the venv, so it happens at most once


def ensure_project_python() -> None:
    """Re-run under the project's venv if this python lacks torch, and with the fixed hash seed
    (lib/warm.py says why)."""
    python = sys.executable
    if importlib.util.find_spec("torch") is None:
        venv = PROJECT_VENV_PYTHON.absolute()
        if not venv.is_file() or os.environ.get(REEXEC_MARK):
            raise SystemExit(f"error: {sys.executable} has no torch; activate the project's environment first "
                             "(source .venv/bin/activate, set up by make run) or run through make (make repro)")
        os.environ[REEXEC_MARK] = "1"
        python = str(venv)
    if python != sys.executable or os.environ.get("PYTHONHASHSEED") != warm.HASH_SEED:
        os.environ["PYTHONHASHSEED"] = warm.HASH_SEED
        os.execv(python, [python, "-m", "stages", *sys.argv[1:]])


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m stages {{{','.join(STAGES)}}}")
    ensure_project_python()
    if warm.enabled():
        status = warm.run_warm(sys.argv)
        if status is not None:
            sys.exit(status)
    gc.disable()
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    gc.freeze()
    gc.enable()
    from stages.lib.cli import run_stage
    try:
        run_stage(stage.main)
    finally:
        if warm.enabled():
            warm.start_server()


if __name__ == "__main__":
    main()
