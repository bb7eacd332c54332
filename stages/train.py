"""Stage `train`: fit a classifier on the train split, pick the best epoch on the val split.

Strategies (the top-level param `strategy`, read once by lib/training.plan_for):
- frozen:   the pretrained backbone is never touched; a new head trains on cached features;
- finetune: that head first (`train.head_epochs`, 0 to skip it as the recipe does), then every
            layer, the backbone at `train.lr * train.backbone_lr_mult`;
- scratch:  the same architecture from random weights, every layer from the start;
- auto:     finetune's phases, but a network epoch becomes the model only if it gets more val
            images right than the head (a tie keeps the head), and the network phase
            stops at the first epoch whose val score does not improve on the phase's best so far:
            where the pretrained features suffice, the head stays.

The best epoch by `train.select_on` on val (accuracy or macro-F1; ties: lower val loss) is written
to models/model.safetensors each time it improves, atomically, so an interrupted run leaves the
last good checkpoint; a killed run resumes from models/train_state.pt. The test split is never
read here. lib/training.py does the work; this module adds the records: DVCLive's per-epoch
plots, the head settings tried, the learning curves, the seconds spent, and the headline metrics
(metrics/train.json).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
from dvclive import Live

from stages.lib.cli import run_stage
from stages.lib.cores import loader_workers
from stages.lib.files import only_writer, write_csv_atomic, write_json_atomic
from stages.lib.head_search import search_table, winner
from stages.lib.params import load_params
from stages.lib.paths import CURVES_PNG, HEAD_SEARCH_CSV, LIVE_DIR, TIME_JSON, TRAIN_LOCK, TRAIN_METRICS, TRAIN_STATE
from stages.lib.plots import save_learning_curves
from stages.lib.runtime import pick_device, start_distributed, stop_distributed, stop_on_sigterm
from stages.lib.training import Trained, train_and_calibrate

log = logging.getLogger("train")


def write_records(trained: Trained, started: float) -> None:
    best, select_on = trained.records.best, trained.records.params.train.select_on
    # The head settings tried, the one trained marked (a header only without a head phase).
    trials = trained.trials
    write_csv_atomic(HEAD_SEARCH_CSV, search_table(trials, winner(trials, select_on) if trials else None))
    save_learning_curves(trained.records.history, best.epoch, CURVES_PNG)
    seconds = {name: round(value, 2) for name, value in sorted(trained.run.timing.items())}
    # With the share of the machine the stage ran on (lib/cores.py), which the times depend on.
    write_json_atomic(TIME_JSON, {**seconds, "total": round(time.perf_counter() - started, 2),
                                  "threads": torch.get_num_threads(),
                                  "loader_workers": loader_workers(trained.records.params.train.workers)})
    write_json_atomic(TRAIN_METRICS, {"val_accuracy": best.val_acc})


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    rank, world_size = start_distributed()
    stop_on_sigterm()
    # One training at a time writes models/ and metrics/train, resumes or appends to them.
    with only_writer(TRAIN_LOCK, str(TRAIN_STATE)) if rank == 0 else nullcontext():
        with (Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False) if rank == 0 else nullcontext()) as live:
            trained = train_and_calibrate(params, pick_device(), live, rank, world_size)
            if live is not None:
                # The best epoch's val scores, flat (DVCLive adds `step`); every epoch's stay in its plots.
                best = trained.records.best
                live.summary = {"best_epoch": best.epoch, "val_accuracy": best.val_acc,
                                "val_macro_f1": best.val_f1, "val_loss": best.val_loss,
                                "temperature": trained.checkpoint.temperature,
                                "temperature_fitted": trained.temperature_fitted,
                                "network_steps": trained.run.network_steps,
                                "step": live.summary.get("step", live.step)}
                if trained.over_budget is not None:
                    live.summary["time_budget_overrun_s"] = trained.over_budget
        stop_distributed(world_size)
        if rank == 0:
            write_records(trained, started)


if __name__ == "__main__":
    run_stage(main)
