"""`python -m stages NAME`: run one stage, as dvc.yaml does (`python -m stages.NAME` works too).

A stage is a short-lived process whose imports (torch, and timm, pandas, matplotlib, ...) create
about a million Python objects, none of them garbage. Letting the cyclic garbage collector scan
them while importing, and once more at exit, costs about 0.7 s per stage on 2 cores; so collection
waits until the imports are done, and what they made is moved out of its reach (gc.freeze).
"""

import gc
import importlib
import sys

STAGES = ("download", "index", "weights", "features", "train", "evaluate", "export_backbone", "export")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        raise SystemExit(f"usage: python -m stages {{{','.join(STAGES)}}}")
    gc.disable()
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    gc.freeze()
    gc.enable()
    from stages.cli import run_stage
    run_stage(stage.main)


if __name__ == "__main__":
    main()
