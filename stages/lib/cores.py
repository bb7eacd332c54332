"""How many cores a stage may use: the one answer for torch, data-loader workers, ONNX Runtime and
the index's validation pool.

By default every core this process may run on. With OMP_NUM_THREADS set, that many: torch reads
the variable itself at start, and the rest follow it here, so experiments run side by side share
the machine instead of each taking every core (`OMP_NUM_THREADS=1 dvc queue start -j 2` on two
cores; docs/scaling.md). An environment variable, not a param: the share of the machine changes
how fast a stage runs, not what it writes, so it must not rerun stages or enter `dvc exp show`.
"""

from __future__ import annotations

import os


def cpu_threads() -> int:
    """OMP_NUM_THREADS when it is a positive whole number, else the cores this process may use."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        threads = 0
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """Data-loader processes: the param's number, at most one per core this stage may use."""
    return min(requested, cpu_threads())
