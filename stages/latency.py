"""Stage `latency`: how fast the shipped model runs on this machine (release/dvc.yaml).

Writes metrics/latency.json, a plain output and not a metric (timings differ on every run and
machine, and would fill `dvc exp show`), and metrics/latency/engines.csv, a row per engine for
DVC's plots: for PyTorch fp32 (the checkpoint), ONNX Runtime fp32 (model.onnx) and ONNX Runtime
INT8 (model.int8.onnx, when the export shipped it), the batch-1 latency (median and p90 of
latency.runs runs after a warm-up) and the images per second in batches of 32; with the thread
count used (one per core this process may run on, or OMP_NUM_THREADS), the threads of other
processes running when it timed (`other_threads_running`: with more threads than cores,
`machine_busy` is true and a warning says the figures are the load's, not the model's) and the
md5 of the model timed. The figures are this machine's: they compare the engines here, not
machines. Its own stage, so that the export stays torch-free and `dvc repro export` skips the
timing.
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import run_stage
from stages.lib.cores import cpu_threads
from stages.lib.files import file_sha256, write_csv_atomic, write_json_atomic
from stages.lib.latency import busy, engine_speed, onnx_runner, other_running_threads, torch_runner
from stages.lib.params import load_params
from stages.lib.paths import EXPORT_DIR, LATENCY_CSV, LATENCY_JSON, MODEL
from stages.lib.serve import INT8_ONNX, MODEL_ONNX

log = logging.getLogger("latency")


def main() -> None:
    runs = load_params().latency.runs
    checkpoint = read_checkpoint(MODEL)
    size = checkpoint.preprocessing.input_size
    threads = cpu_threads()
    before = other_running_threads()
    speed = {"threads": threads, "input_size": size}
    speed.update(engine_speed("torch_fp32", torch_runner(checkpoint, threads), size, runs))
    speed.update(engine_speed("onnx_fp32", onnx_runner(EXPORT_DIR / MODEL_ONNX, threads), size, runs))
    if (EXPORT_DIR / INT8_ONNX).is_file():
        speed.update(engine_speed("onnx_int8", onnx_runner(EXPORT_DIR / INT8_ONNX, threads), size, runs))
    after = other_running_threads()
    others = None if before is None or after is None else max(before, after)
    speed.update(other_threads_running=others, machine_busy=busy(others, threads),
                 model_md5=file_sha256(MODEL, "md5"))
    write_json_atomic(LATENCY_JSON, speed)
    engines = [name for name in ("torch_fp32", "onnx_fp32", "onnx_int8") if f"{name}_latency_ms_median" in speed]
    write_csv_atomic(LATENCY_CSV, pd.DataFrame([{"engine": name, **{what: speed[f"{name}_{what}"] for what in (
        "latency_ms_median", "latency_ms_p90", "images_per_s_batch32")}} for name in engines]))
    if speed["machine_busy"]:
        log.warning("%s: not the model's latency: %g other threads were running beside its %d on %d cores; rerun "
                    "on an idle machine (dvc repro -f latency)", LATENCY_JSON, others, threads, os.cpu_count())
    log.info("batch-1 latency (median, %d threads%s): %s; %s (%s)", threads,
             " from OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else ", one per core this stage may use",
             ", ".join(f"{name} {speed[f'{name}_latency_ms_median']:.1f} ms" for name in engines),
             ", ".join(f"{name} {speed[f'{name}_images_per_s_batch32']:.0f} images/s" for name in engines),
             LATENCY_JSON)


if __name__ == "__main__":
    run_stage(main)
