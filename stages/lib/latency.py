"""How fast the shipped model runs on this machine: batch-1 latency and batch-32 throughput per
engine. Machine-dependent by nature (metrics/latency.json says which thread count); the figures
compare engines on one machine, not machines."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

WARMUP_RUNS = 3
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 32, 2


def other_running_threads(reads: int = 10, interval: float = 0.02) -> float | None:
    """Threads of other processes running or ready to run: the median of a few reads of the
    kernel's count (/proc/stat's procs_running, less the reading thread). None where it is not
    known. Unlike the load average, it is now's count, not the last minute's."""
    counts = []
    for _ in range(reads):
        try:
            found = re.search(r"^procs_running (\d+)$", Path("/proc/stat").read_text(), re.MULTILINE)
        except OSError:
            return None
        if found is None:
            return None
        counts.append(int(found.group(1)) - 1)
        time.sleep(interval)
    return float(np.median(counts))


def busy(others: float | None, threads: int) -> bool:
    """Whether timing `threads` threads now measures the machine's load rather than the model: the
    other threads and these outnumber the cores, so some wait for a core (OpenMP's threads spin
    while they wait: a batch-1 latency of 26 ms on an idle core was 1.4 s on a loaded machine)."""
    return others is not None and others + threads > (os.cpu_count() or 1)


def engine_speed(name: str, run: Callable[[np.ndarray], object], size: int, runs: int) -> dict[str, float]:
    """`run` on one image `runs` times after a warm-up (median and p90 milliseconds), then on
    batches of 32 (images per second); flat keys prefixed with the engine's name."""
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    batch = rng.standard_normal((THROUGHPUT_BATCH, 3, size, size), dtype=np.float32)
    for _ in range(WARMUP_RUNS):
        run(one)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - started)
    run(batch)
    started = time.perf_counter()
    for _ in range(THROUGHPUT_RUNS):
        run(batch)
    seconds = time.perf_counter() - started
    return {f"{name}_latency_ms_median": round(1000 * float(np.median(times)), 3),
            f"{name}_latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 3),
            f"{name}_images_per_s_batch{THROUGHPUT_BATCH}": round(THROUGHPUT_BATCH * THROUGHPUT_RUNS / seconds, 2)}


def onnx_runner(path, threads: int) -> Callable[[np.ndarray], object]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})


def torch_runner(checkpoint, threads: int) -> Callable[[np.ndarray], object]:
    """The checkpoint's network in PyTorch, on the CPU in fp32, as predict runs it there."""
    import torch

    torch.set_num_threads(threads)
    model = checkpoint.classifier().eval().to(memory_format=torch.channels_last)

    def run(images: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(images).contiguous(memory_format=torch.channels_last))

    return run
