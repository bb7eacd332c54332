"""Stage `train`: fit a classifier on the train split, pick the best epoch on the val split.

Strategies (the top-level param `strategy`, read once by lib/training.plan_for):
- frozen:   the pretrained backbone is never touched; a new head trains on cached features;
- finetune: that head first (`train.head_epochs`, 0 to skip it as the recipe does), then every
            layer, the backbone at `train.lr * train.backbone_lr_mult`;
- scratch:  the same architecture from random weights, every layer from the start;
- auto:     finetune's phases, but a network epoch becomes the model only if it is significantly
            better than the head on the val split (McNemar's exact test), and the network phase
            stops at the first epoch whose val score does not improve on the phase's best so far:
            where the pretrained features suffice, the head stays.

The best epoch by val accuracy (ties: lower val loss) is written to models/model.pt each time it
improves, atomically, so an interrupted run leaves the last good checkpoint; a killed run
resumes from models/train_state.pt. The test split is never read here.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from dvclive import Live

from stages.lib.backbones import Preprocessing, read_pretrained_and_sha256
from stages.lib.bookkeeping import Books, read_resume_state, run_fingerprint
from stages.lib.calibration import fit_temperature, negative_log_likelihood
from stages.lib.checkpoint import Checkpoint, save_checkpoint
from stages.lib.cli import run_stage
from stages.lib.data import read_classes, read_split
from stages.lib.features import split_probabilities
from stages.lib.inference import calibrate
from stages.lib.files import write_csv_atomic, write_json_atomic
from stages.lib.head_search import Trial, search_table, winner
from stages.lib.params import load_params
from stages.lib.paths import (CURVES_PNG, HEAD_SEARCH_CSV, INDEX_CSV, LIVE_DIR, MODEL, PRETRAINED, TIME_JSON,
                              features_file)
from stages.lib.plots import save_learning_curves
from stages.lib.runtime import pick_device, start_distributed, stop_distributed, stop_on_sigterm
from stages.lib.training import Model, Run, make_run, plan_for, train_model

log = logging.getLogger("train")


def train_with_records(plan, model: Model, run: Run, classes: list[str], prep: Preprocessing,
                       pretrained_sha256: str) -> Books:
    """The plan's phases with DVCLive (first process only) and a resumable state; Ctrl-C or
    SIGTERM leave the best epoch so far in models/model.pt."""
    params = run.params
    fingerprint = run_fingerprint(params, [PRETRAINED, INDEX_CSV, features_file("train"), features_file("val")],
                                  {PRETRAINED: pretrained_sha256})
    resumed = read_resume_state(fingerprint)
    with (Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False) if run.rank == 0 else nullcontext()) as live:
        books = Books(params, classes, prep, pretrained_sha256, run.timing, live, fingerprint)
        try:
            trials = train_model(plan, model, books, run, prep, pretrained_sha256, resumed)
        except KeyboardInterrupt:
            books.save_best()
            log.error("interrupted: %s keeps the best epoch so far (%s)", MODEL,
                      books.best.epoch if books.best else "none yet")
            sys.exit(130)
        books.save_best()
        if run.rank == 0:
            write_search_table(trials, params.train.select_on)
        if live is not None:
            # The final summary is the best epoch's val scores, flat: what `dvc exp show` prints
            # (DVCLive adds `step`); every epoch's values stay in its plots.
            best = books.best
            live.summary = {"best_epoch": best.epoch, "val_accuracy": best.val_acc, "val_macro_f1": best.val_f1,
                            "val_loss": best.val_loss, "step": live.summary.get("step", live.step)}
    return books


def write_search_table(trials: list[Trial], select_on: str) -> None:
    """The head settings tried, the one trained marked (a header only without a head phase)."""
    write_csv_atomic(HEAD_SEARCH_CSV, search_table(trials, winner(trials, select_on) if trials else None))


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    rank, world_size = start_distributed()
    torch.manual_seed(params.train.seed)
    stop_on_sigterm()
    classes = read_classes()
    pretrained, pretrained_sha256 = read_pretrained_and_sha256(PRETRAINED)
    plan = plan_for(params, has_pretrained=pretrained["state_dict"] is not None)
    prep = Preprocessing.from_dict(pretrained["preprocessing"])
    train_labels = torch.tensor(read_split("train")["label"].tolist())
    run = make_run(params, pick_device(), train_labels, len(classes), rank, world_size)
    log.info("strategy %s, backbone %s, %d classes, device %s", params.strategy, params.model.backbone, len(classes),
             run.device)
    model = Model(pretrained["state_dict"])
    books = train_with_records(plan, model, run, classes, prep, pretrained_sha256)
    stop_distributed(world_size)
    if rank > 0:
        return
    best = books.best
    save_learning_curves(books.history, best.epoch, CURVES_PNG)
    seconds = {name: round(value, 2) for name, value in sorted(run.timing.items())}
    write_json_atomic(TIME_JSON, {**seconds, "total": round(time.perf_counter() - started, 2)})
    books.save_resume_state(model, complete=True)
    log.info("best epoch %d (%s): val acc %.4f, val loss %.4f", best.epoch, best.phase, best.val_acc, best.val_loss)
    save_checkpoint(MODEL, with_fitted_temperature(books.best_checkpoint, params))


def with_fitted_temperature(checkpoint: Checkpoint, params) -> Checkpoint:
    """The checkpoint with the temperature that makes its val probabilities best calibrated (the
    lowest NLL); the predicted classes do not change."""
    probs, labels = split_probabilities(checkpoint, "val", read_split("val"), params.train.batch_size,
                                        params.train.workers)
    log_probs, y = probs.clamp_min(1e-12).log().numpy(), labels.numpy()
    temperature = fit_temperature(log_probs, y)
    before = negative_log_likelihood(probs.numpy(), y)
    after = negative_log_likelihood(calibrate(probs, temperature).numpy(), y)
    log.info("temperature %.4g fitted on the val split: NLL %.4f -> %.4f", temperature, before, after)
    return replace(checkpoint, temperature=temperature)


if __name__ == "__main__":
    run_stage(main)
