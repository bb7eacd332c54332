"""The pipeline's stages, one module each, run as `python -m stages NAME`; lib/ holds what they share.
predict, compare and sweep are commands a person runs (`python -m stages.predict`, ...), not
stages: no pipeline file runs them.

A stage process imports torch, pandas, matplotlib, ...: about a million objects, none of them
garbage. Python's cyclic collector scanning them again and again while they are imported costs
0.4 to 1.3 s per stage on two cores. So when this package is imported to run a program (`python -m
stages NAME`, `python -m stages.NAME`: sys.argv[0] is "-m" until the module is found), collection
waits until the program's imports are done, and run_stage (lib/cli.py) moves what they made out
of the collector's reach (gc.freeze) before turning it back on. Imported as a library (tests),
nothing changes.
"""

import gc
import sys

if sys.argv[:1] == ["-m"]:
    gc.disable()
