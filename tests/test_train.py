"""Stage `train`: every strategy on a tiny backbone, checkpoints, determinism, clean stops."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from stages import train
from stages.lib.checkpoint import read_checkpoint
from stages.lib.cli import UserError
from stages.lib.files import file_sha256
from tests.conftest import PROJECT_ROOT, params_with_train, random_feature_split


def load_model_checkpoint(root):
    """The checkpoint's fields as a dict, its tensors as torch's."""
    data = read_checkpoint(root / "models/model.safetensors").to_dict()
    return {**data, "state_dict": {name: torch.from_numpy(value) for name, value in data["state_dict"].items()}}


def backbone_state(root, source="models/pretrained.pt"):
    return torch.load(root / source, weights_only=True)["state_dict"]


def test_frozen_trains_only_the_head(tiny_project):
    root = tiny_project(strategy="frozen")
    train.main()
    checkpoint = load_model_checkpoint(root)
    pretrained = backbone_state(root)
    trained = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    assert trained.keys() == pretrained.keys()
    assert all(torch.equal(trained[k], pretrained[k]) for k in pretrained)  # BatchNorm statistics included
    assert checkpoint["classes"] == ["blue", "red"] and checkpoint["strategy"] == "frozen"
    assert checkpoint["preprocessing"]["input_size"] == 160 and checkpoint["metrics"]["phase"] == "head"
    assert 1 <= checkpoint["epoch"] <= 3
    assert checkpoint["pretrained_backbone_sha256"] == file_sha256(root / "models/pretrained.pt")
    assert checkpoint["version"] == 4 and checkpoint["tta"] == "none"
    # Six val images: too few to fit a temperature on, so it stays 1, and the metrics say so.
    assert checkpoint["temperature"] == 1.0
    summary = json.loads((root / "metrics/train/metrics.json").read_text())
    assert summary == {"best_epoch": checkpoint["epoch"], "val_accuracy": checkpoint["metrics"]["val_acc"],
                       "val_macro_f1": checkpoint["metrics"]["val_f1"], "val_loss": checkpoint["metrics"]["val_loss"],
                       "temperature": 1.0, "temperature_fitted": False, "network_steps": 0, "step": 2}
    assert (root / "metrics/train/plots/metrics/val/acc.tsv").read_text().count("\n") == 4  # header + 3 epochs
    assert (root / "metrics/train/learning_curves.png").stat().st_size > 1000


# finetune, 3 head epochs: train.head_max_steps lets one of them fit, and the network's epochs follow it
@pytest.mark.parametrize("strategy, head_epochs, epochs", [("finetune", 3, 2), ("finetune", 0, 2), ("scratch", 3, 2)])
def test_strategies_that_train_the_backbone(tiny_project, strategy, head_epochs, epochs):
    root = tiny_project(strategy=strategy, train={"head_epochs": head_epochs, "epochs": epochs, "head_max_steps": 1})
    train.main()
    steps = (root / "metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()
    warm_head = strategy == "finetune" and head_epochs > 0
    assert len(steps) == 1 + epochs + (1 if warm_head else 0)
    assert [int(line.split("\t")[0]) for line in steps[1:]] == list(range(len(steps) - 1))
    checkpoint = load_model_checkpoint(root)
    model = read_checkpoint(root / "models/model.safetensors").classifier()
    assert model(torch.zeros(1, 3, 160, 160)).shape == (1, 2)
    timing = json.loads((root / "metrics/train/time.json").read_text())
    assert timing["compute"] > 0 and timing["data"] >= 0 and timing["validate"] > 0
    train_images = len(pd.read_csv(root / "data/index.csv").query("split == 'train'"))
    summary = json.loads((root / "metrics/train/metrics.json").read_text())
    assert summary["network_steps"] == epochs * -(-train_images // 8)  # batches of 8
    assert ("head" in timing) == warm_head and timing["total"] >= timing["compute"]
    # Whatever epoch won, the backbone must have moved in the network phase.
    pretrained = backbone_state(root)
    trained_backbone = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()
                        if k.startswith("backbone.")}
    if checkpoint["metrics"]["phase"] == "network":
        assert any(not torch.equal(trained_backbone[k], pretrained[k]) for k in pretrained)
        assert checkpoint["pretrained_backbone_sha256"] is None  # cached features no longer apply


@pytest.mark.parametrize("strategy, head_epochs, expected", [
    ("frozen", 3, (True, False, True, 0.0, 0.01, False)),
    ("finetune", 3, (True, True, True, 0.001, 0.001, False)),  # the warm head moves as gently as the backbone
    ("finetune", 0, (False, True, True, 0.001, 0.01, False)),  # the recipe's cold start
    ("scratch", 3, (False, True, False, 0.01, 0.01, False)),
    ("auto", 3, (True, True, True, 0.001, 0.001, True)),  # finetune's plan, network epochs gated on val
])
def test_what_each_strategy_trains(project, strategy, head_epochs, expected):
    from dataclasses import astuple

    from stages.lib.params import load_params
    from stages.lib.training import plan_for

    project(strategy=strategy, train={"lr": 0.01, "backbone_lr_mult": 0.1, "head_epochs": head_epochs})
    assert astuple(plan_for(load_params(), has_pretrained=True)) == pytest.approx(expected)


@pytest.mark.slow
def test_training_is_deterministic_on_cpu(tiny_project):
    root = tiny_project(strategy="finetune", train={"workers": 1})
    train.main()
    first = (root / "metrics/train/metrics.json").read_text(), load_model_checkpoint(root)["state_dict"]
    train.main()
    second = (root / "metrics/train/metrics.json").read_text(), load_model_checkpoint(root)["state_dict"]
    assert first[0] == second[0]
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_mlp_head(tiny_project):
    root = tiny_project(strategy="frozen", model={"head": "mlp", "hidden": 8})
    train.main()
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert checkpoint.head == {"kind": "mlp", "hidden": 8, "dropout": 0.2}
    assert checkpoint.classifier().head[1].out_features == 8


def test_early_stopping_after_patience_epochs_without_progress(project):
    from stages.lib.params import load_params
    from stages.lib.preprocessing import Preprocessing
    from stages.lib.records import Epoch, EpochResult, Records
    from stages.lib.training import ModelParts, record_phase

    project(train={"patience": 2})
    prep = Preprocessing(8, 8, (0.5,) * 3, (0.5,) * 3, "bilinear")
    records = Records(load_params(), ["a", "b"], prep, "0" * 64, Counter(), writes=False)
    model = ModelParts(pretrained={"w": torch.zeros(1)}, head=torch.nn.Linear(2, 2))
    scores = [(0.5, 0.9), (0.7, 0.8), (0.7, 0.85), (0.6, 0.7), (0.9, 0.1), (1.0, 0.0)]
    consumed = []

    def epochs():
        for i, (acc, loss) in enumerate(scores, start=1):
            consumed.append(i)
            yield Epoch(EpochResult(i, "head", 1.0, 0.5, loss, acc, acc, 0.1))

    record_phase(epochs(), records, model, patience=2)
    assert consumed == [1, 2, 3, 4]  # epochs 3 and 4 did not beat epoch 2: stop
    records.save_best()
    assert records.best.epoch == 2 and records.best_checkpoint.epoch == 2
    assert records.best_checkpoint.pretrained_backbone_sha256 == "0" * 64  # a head epoch: backbone untouched


def test_non_finite_loss_stops_with_a_hint(tiny_project):
    tiny_project(strategy="scratch", train={"optimizer": "sgd", "lr": 1e12, "scheduler": "none", "epochs": 3})
    with pytest.raises(UserError, match=r"epoch \d: the loss became (nan|inf); lower train.lr"):
        train.main()


def test_frozen_needs_pretrained_weights(tiny_project):
    tiny_project(run_features=False, strategy="scratch", model={"weights": "none"})
    train.main()  # scratch is fine without pretrained weights
    tiny_project(run_features=False, strategy="frozen", model={"weights": "none"})
    with pytest.raises(UserError, match=r"strategy frozen needs pretrained weights, but model.weights is none"):
        train.main()


@pytest.mark.slow
def test_sigterm_keeps_the_last_good_checkpoint(tiny_project):
    root = tiny_project(strategy="finetune", train={"epochs": 200, "scheduler": "none", "lr": 1e-4})
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (root / "models/model.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    # 130, or death by SIGINT, which a shell and DVC also report as 130: when SIGTERM lands while
    # the network phase is being set up, strace shows the stage handling it (checkpoint kept,
    # message logged) and CPython then ending the process by re-raising SIGINT, as it does when it
    # counts a KeyboardInterrupt as unhandled.
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "interrupted: models/model.safetensors keeps the best epoch so far" in stderr
    checkpoint = load_model_checkpoint(root)
    assert checkpoint["epoch"] >= 1
    temporary = [p for p in (root / "models").iterdir() if p.name.startswith(".") and p.name != ".train.lock"]
    assert not temporary  # no temporary files left (the lock stays: held only while a run lives)


def test_mixed_precision_on_cpu_only_where_bf16_pays(monkeypatch):
    from stages.lib import runtime

    cpu = torch.device("cpu")
    for flags, autocasts in (({"avx2"}, (False, False, False)), ({"avx512_bf16"}, (True, False, False)),
                             ({"avx512_bf16", "amx_bf16"}, (True, True, False))):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: frozenset(flags))
        for amp, expected in zip((True, "auto", False), autocasts):
            with runtime.autocast(cpu, amp=amp):
                assert torch.is_autocast_enabled("cpu") == expected, (flags, amp)
                assert not expected or torch.get_autocast_dtype("cpu") == torch.bfloat16


def training_started(root, process, network_epochs: int = 1) -> None:
    """Wait until the run in `process` has done `network_epochs` epochs of the whole network (its
    resume state says so)."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "training ended first"
        try:
            state = torch.load(root / "models/train_state.pt", weights_only=True)
            if not state["complete"] and (state["network"] or {}).get("epochs_done", 0) >= network_epochs:
                return
        except (EOFError, RuntimeError, FileNotFoundError, KeyError):
            pass
        time.sleep(0.02)


def run_train(root, env) -> subprocess.CompletedProcess:
    """The train stage as dvc.yaml runs it."""
    result = subprocess.run([sys.executable, "-m", "stages", "train"], cwd=root, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_a_killed_run_resumes_after_its_last_epoch_with_the_same_result(tiny_project):
    # The class-balanced sampler draws with replacement: a resumed epoch must draw exactly the same.
    root = tiny_project(strategy="finetune", model={"dropout": 0.3},
                        train={"head_epochs": 2, "epochs": 4, "workers": 1, "scheduler": "onecycle",
                               "class_weighting": "sampler"})
    env = dict(os.environ)
    run_train(root, env)
    reference = (root / "metrics/train/metrics.json").read_text(), load_model_checkpoint(root)["state_dict"]
    state_file = root / "models/train_state.pt"
    assert torch.load(state_file, weights_only=True)["complete"]  # a finished run is not resumed: it starts afresh

    process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    training_started(root, process, network_epochs=2)
    process.kill()  # SIGKILL: no handler runs, as after a power cut
    process.wait()
    killed = torch.load(state_file, weights_only=True)
    assert not killed["complete"] and 2 <= killed["network"]["epochs_done"] < 4

    resumed = run_train(root, env)
    assert f"resuming an interrupted run after epoch {2 + killed['network']['epochs_done']}" in resumed.stderr
    assert (root / "metrics/train/metrics.json").read_text() == reference[0]
    final = load_model_checkpoint(root)["state_dict"]
    assert all(torch.equal(final[k], reference[1][k]) for k in reference[1])
    steps = (root / "metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()
    assert len(steps) == 1 + 2 + 4  # the interrupted run's epochs are logged once


def test_balanced_weights_and_weighted_loss(project):
    from stages.lib.params import load_params
    from stages.lib.training import balanced_class_weights, make_run

    labels = torch.tensor([0, 0, 0, 1])
    assert balanced_class_weights(labels, 2).tolist() == pytest.approx([4 / 6, 2.0])
    project(train={"class_weighting": "balanced", "label_smoothing": 0.0})
    run = make_run(load_params(), torch.device("cpu"), labels, 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weights = torch.tensor([4 / 6, 2.0])
    assert run.loss(logits, targets).item() == pytest.approx(((each * weights).sum() / weights.sum()).item())
    project(train={"class_weighting": "none"})
    assert make_run(load_params(), torch.device("cpu"), labels, 2).class_weights is None


def test_the_balanced_sampler_draws_every_class_equally_often_and_replays_an_epoch():
    from stages.lib.data import EpochSampler
    from stages.lib.training import balanced_sample_weights

    labels = torch.tensor([0] * 180 + [1] * 20)
    sampler = EpochSampler(200, shuffle=True, seed=3, weights=balanced_sample_weights(labels, 2))
    sampler.set_epoch(1)
    first = [i for _, i in sampler]
    drawn = labels[first]
    assert len(first) == 200 and 70 <= int((drawn == 1).sum()) <= 130  # about half, not a tenth
    assert [i for _, i in sampler] == first  # the same epoch again: the same draw (resumable)
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != first


@pytest.mark.parametrize("weighting", ["balanced", "sampler"])
def test_class_weighting_trains_both_phases_deterministically(tiny_project, weighting):
    root = tiny_project(strategy="finetune", train={"class_weighting": weighting, "head_epochs": 2, "epochs": 1})
    train.main()
    if weighting == "sampler":  # the one that draws: the same draw again
        first = (root / "metrics/train/metrics.json").read_text()
        train.main()
        assert (root / "metrics/train/metrics.json").read_text() == first
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert checkpoint.params["train"]["class_weighting"] == weighting


def test_the_best_epoch_by_macro_f1_or_accuracy():
    from stages.lib.records import EpochResult

    accurate = EpochResult(1, "head", 0.5, 0.9, 0.4, val_acc=0.90, val_f1=0.60, lr=0.1)
    balanced = EpochResult(2, "head", 0.5, 0.9, 0.5, val_acc=0.85, val_f1=0.80, lr=0.1)
    assert accurate.beats(balanced, "accuracy") and not balanced.beats(accurate, "accuracy")
    assert balanced.beats(accurate, "macro_f1") and not accurate.beats(balanced, "macro_f1")
    tie = EpochResult(3, "head", 0.5, 0.9, 0.3, val_acc=0.90, val_f1=0.60, lr=0.1)
    assert tie.beats(accurate, "accuracy")  # same score, lower val loss


def test_a_leftover_state_of_other_params_or_a_finished_run_is_not_resumed(project, caplog):
    from stages.lib.paths import TRAIN_STATE
    from stages.lib.records import read_resume_state

    root = project()
    (root / "models").mkdir()
    torch.save({"fingerprint": "of other params", "complete": False}, root / TRAIN_STATE)
    caplog.set_level("INFO")
    assert read_resume_state("of these params") is None
    assert "from a run with other params or inputs: starting afresh" in caplog.text
    assert read_resume_state("of other params") == {"fingerprint": "of other params", "complete": False}
    torch.save({"fingerprint": "of these params", "complete": True}, root / TRAIN_STATE)
    assert read_resume_state("of these params") is None  # finished: dvc repro -f trains afresh
    (root / TRAIN_STATE).write_bytes(b"truncated")
    assert read_resume_state("of these params") is None and "unreadable" in caplog.text


@pytest.mark.slow
def test_partial_finetuning_leaves_the_early_layers_as_pretrained(tiny_project):
    from stages.lib.training import freeze_early_weights

    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 1, "trainable_fraction": 0.5,
                                                    "freeze_bn": False})
    train.main()
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert checkpoint.metrics["phase"] == "network"
    backbone = checkpoint.classifier().backbone
    trainable, total = freeze_early_weights(backbone, 0.5)
    assert 0 < trainable < total
    frozen_modules = [name for name, module in backbone.named_modules()
                      if any(True for _ in module.parameters(recurse=False))
                      and not any(w.requires_grad for w in module.parameters(recurse=False))]
    pretrained, trained = backbone_state(root), backbone.state_dict()
    frozen = [k for k in pretrained if k.rsplit(".", 1)[0] in frozen_modules]  # weights and BatchNorm statistics
    moved = [k for k in pretrained if not torch.equal(trained[k], pretrained[k])]
    assert frozen and all(torch.equal(trained[k], pretrained[k]) for k in frozen)
    assert moved and not set(moved) & set(frozen)


def test_the_network_trains_on_crops_of_train_image_size_and_validates_at_the_backbone_size(tiny_project):
    from stages.lib.params import load_params
    from stages.lib.preprocessing import Preprocessing
    from stages.lib.training import make_run, network_loaders

    tiny_project(strategy="finetune", train={"image_size": 96, "workers": 0, "eval_size": None})
    params = load_params()
    prep = Preprocessing.from_dict(torch.load("models/pretrained.pt", weights_only=True)["preprocessing"])
    _, train_loader, val_loader = network_loaders(make_run(params, torch.device("cpu"), torch.tensor([0, 1]), 2), prep)
    assert next(iter(train_loader))[0].shape[-2:] == (96, 96)
    assert next(iter(val_loader))[0].shape[-2:] == (prep.input_size, prep.input_size) != (96, 96)
    # train.eval_size: validated there instead
    params = params.model_copy(update={"train": params.train.model_copy(update={"eval_size": 112})})
    _, _, val_loader = network_loaders(make_run(params, torch.device("cpu"), torch.tensor([0, 1]), 2), prep)
    assert next(iter(val_loader))[0].shape[-2:] == (112, 112)


@pytest.mark.slow  # trains, evaluates, exports and predicts
def test_a_network_model_is_scored_at_train_eval_size_everywhere(tiny_project):
    from stages import evaluate, export, predict

    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 1, "eval_size": 112})
    train.main()
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    pretrained = torch.load(root / "models/pretrained.pt", weights_only=True)["preprocessing"]
    assert (checkpoint.preprocessing.input_size, pretrained["input_size"]) == (112, 160)
    assert checkpoint.preprocessing.resize_size == round(112 * pretrained["resize_size"] / 160)
    evaluate.main()
    export.main()
    side = json.loads((root / "models/export/model.json").read_text())
    assert (side["input_size"], side["resize_size"]) == (112, checkpoint.preprocessing.resize_size)
    # evaluate and predict score the same image alike: at the checkpoint's size
    evaluated = pd.read_csv(root / "metrics/predictions.csv").iloc[0]
    assert predict.main([str(root / "data/raw" / evaluated["path"]), "--out", "one.csv", "--workers", "0"]) == 0
    predicted = pd.read_csv(root / "one.csv").iloc[0]
    assert predicted["probability"] == pytest.approx(evaluated["probability"], abs=1e-5)


def test_a_network_epoch_pays_only_when_it_gets_more_val_images_right_than_the_head():
    from stages.lib.training import pays_on_val

    head = [True] * 40 + [False] * 10
    assert not pays_on_val(head, head)
    assert pays_on_val(head, [True] * 41 + [False] * 9)  # one more right
    assert not pays_on_val(head, [False] * 10 + [True] * 30 + [True] * 10)  # 10 gained, 10 lost: a tie keeps the head
    assert not pays_on_val(head, [True] * 39 + [False] * 11)


@pytest.mark.parametrize("network_pays", [False, True])
def test_auto_keeps_the_head_unless_the_network_pays_on_val(tiny_project, monkeypatch, network_pays):
    from stages.lib import training

    root = tiny_project(strategy="auto", train={"head_epochs": 2, "epochs": 3})
    monkeypatch.setattr(training, "pays_on_val", lambda head, right: network_pays)
    train.main()
    steps = (root / "metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    def column(name):
        rows = (root / f"metrics/train/plots/metrics/val/{name}.tsv").read_text().strip().splitlines()[1:]
        return [float(row.split("\t")[-1]) for row in rows]

    # The phase goes on while its own val score improves (accuracy, then lower loss), and stops at
    # the first epoch that does not (or after train.epochs), whether or not epochs pay.
    scores = list(zip(column("acc"), [-loss for loss in column("loss")]))
    head_best, best = max(scores[:2]), None
    network_epochs = 0
    for score in scores[2:]:
        network_epochs += 1
        if best is not None and score <= best:
            break
        best = score if best is None else max(best, score)
    best = max(best, head_best)
    assert len(steps) == 1 + len(scores) == 1 + 2 + network_epochs and 1 <= network_epochs <= 3
    if network_pays:
        assert (checkpoint.metrics["val_acc"], -checkpoint.metrics["val_loss"]) == pytest.approx(best)
    else:  # no network epoch becomes the model: the head's best stays, on the cached features
        assert checkpoint.metrics["phase"] == "head" and checkpoint.pretrained_backbone_sha256 is not None
        assert (checkpoint.metrics["val_acc"], -checkpoint.metrics["val_loss"]) == pytest.approx(head_best)


def test_the_budget_schedule_warms_up_then_falls_linearly_to_zero_at_the_planned_step():
    from stages.lib.optim import LinearToZero

    schedule = LinearToZero(100)
    assert not schedule.planned and schedule(0) == schedule(50) == pytest.approx(0.04)  # timing the pace
    schedule.plan(100)
    assert schedule(0) == pytest.approx(0.04) and schedule(25) == 1 and schedule(100) == 0
    assert schedule(10) < schedule(20) < schedule(25) and schedule(50) == pytest.approx(2 / 3)
    schedule.plan(40)  # the warm-up a quarter of the new total, the end at step 40
    assert schedule(5) == pytest.approx(0.04 + 0.96 / 2) and schedule(10) == 1
    assert schedule(25) == pytest.approx(0.5) and schedule(40) == 0 and schedule(41) == 0
    schedule.replan(70, 25)  # on a better measured pace: from where the rate is, linearly to the new end
    assert schedule(25) == pytest.approx(0.5) and schedule(70) == 0
    assert schedule(47.5) == pytest.approx(0.25) and schedule(71) == 0
    assert LinearToZero(8).__dict__.keys() == schedule.__dict__.keys()  # the plan is saved with the scheduler


def test_a_spent_budget_is_not_planned_again():
    # An epoch's first step can be the plan's last (a pace that slowed): planning again there would
    # go on at the zero rate the schedule has reached.
    from types import SimpleNamespace

    from stages.lib.optim import LinearToZero
    from stages.lib.training import PACE_STEPS, Budget

    schedule = LinearToZero(100)
    schedule.plan(12)
    run = SimpleNamespace(network_steps=12, world_size=1, started=time.perf_counter(),
                          params=SimpleNamespace(train=SimpleNamespace(time_budget=1000.0)))
    budget = Budget(run, schedule, steps_per_epoch=6, validation=0.1, taken=12,
                    timed_from=time.perf_counter() - 1.0, epoch_ends=[0.1])
    assert budget.taken > 1 + PACE_STEPS
    budget.stepped()
    assert budget.spent() and schedule.total == 12
    run.network_steps = 11  # a step before the plan's end, time to spare: planned again, from the rate it has
    budget.stepped()
    assert schedule.total > 12 and schedule(11) == pytest.approx(1 / 9) and schedule(12) > 0


def test_steps_that_fit_count_every_validation_they_bring():
    from stages.lib.training import TAIL_SECONDS, steps_that_fit

    # 100 s left, 1 s a step, 10 steps an epoch, 5 s a validation, 5 steps done: n more steps
    # bring one validation per epoch end reached, one at the end and one for the temperature.
    total = steps_that_fit(100, 1.0, 5.0, 5, 10)
    validations = total // 10 + (total % 10 > 0) + 1
    assert (total - 5) + 5 * validations + TAIL_SECONDS <= 100 < (total + 1 - 5) + 5 * (validations + 1) + TAIL_SECONDS
    assert steps_that_fit(-10, 1.0, 5.0, 5, 10) == 5  # nothing left: no more steps, the phase ends at its validation
    assert steps_that_fit(12, 1.0, 5.0, 5, 10) == 5  # not even one step and its two validations
    assert steps_that_fit(13, 1.0, 5.0, 5, 10) == 6
    # A week at a GPU's pace (a millisecond a step): millions of steps, planned at once (by bisection)
    total = steps_that_fit(604800, 0.001, 5.0, 6, 100)
    validations = total // 100 + (total % 100 > 0) + 1
    assert (total - 6) * 0.001 + 5 * validations + TAIL_SECONDS <= 604800 < (
        (total + 1 - 6) * 0.001 + 5 * ((total + 1) // 100 + ((total + 1) % 100 > 0) + 1) + TAIL_SECONDS)


class SteadyClock:
    """The training module's clock, advancing 20 ms each time it is read: a steady machine, so
    that neither this machine's speed nor a neighbour's load decides the plan (bench.budget
    measures real runs)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.02
        return self.now


def summary_of(root) -> dict:
    return json.loads((root / "metrics/train/metrics.json").read_text())


@pytest.mark.parametrize("batch_size", [2, 8])  # the pace timed within the first epoch, or over two
def test_a_budget_too_small_to_plan_in_stops_at_the_first_validated_epoch_and_says_so(
        tiny_project, monkeypatch, caplog, batch_size):
    from stages.lib import training

    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 3, "time_budget": 1,
                                                    "batch_size": batch_size, "workers": 0})
    monkeypatch.setattr(training, "time", SteadyClock())
    with caplog.at_level("INFO"):
        train.main()
    validations = len((root / "metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()) - 1
    summary = summary_of(root)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "time_budget" in r.getMessage()]
    assert validations == 1 and 1 <= summary["network_steps"] <= 1 + training.PACE_STEPS, summary
    assert len(said) == 1 and re.fullmatch(
        r"train\.time_budget: 1 s cannot hold the network's first 6 timed steps and a validation \([\d.]+ s left, "
        r"[\d.]+ s needed\): stopping (after the epoch just validated|at this epoch's validation)", said[0]), said
    assert "s left at" not in caplog.text  # no plan of negative seconds
    assert summary["time_budget_overrun_s"] >= 0  # recorded (this clock stops when training does: 0 here)


def test_a_head_phase_that_spends_the_budget_is_the_model(tiny_project, monkeypatch, caplog):
    from stages.lib import training

    root = tiny_project(strategy="finetune", train={"head_epochs": 30, "epochs": 3, "time_budget": 0.5,
                                                    "workers": 0})
    monkeypatch.setattr(training, "time", SteadyClock())
    with caplog.at_level("INFO"):
        train.main()
    summary = summary_of(root)
    assert summary["network_steps"] == 0 and summary["best_epoch"] <= 30 and summary["time_budget_overrun_s"] > 0
    assert "spent by the head phase" in caplog.text and "the network phase is skipped" in caplog.text
    assert f"the stage ran {summary['time_budget_overrun_s']:.1f} s over its 0.5 s" in caplog.text


@pytest.mark.slow  # runs for its budget
def test_a_budgeted_run_ends_within_its_budget_its_learning_rate_at_zero(tiny_project, monkeypatch):
    from stages.lib import training

    lrs = []  # after each step of the network phase
    step = training.Optimization.step

    def recording(self, loss):
        step(self, loss)
        lrs.append(self.lr())

    monkeypatch.setattr(training.Optimization, "step", recording)

    budget = 15.0
    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 1, "time_budget": budget,
                                                    "batch_size": 2, "workers": 0})
    clock = SteadyClock()
    monkeypatch.setattr(training, "time", clock)
    started = clock.now
    train.main()
    seconds = clock.now - started
    assert summary_of(root)["time_budget_overrun_s"] == 0
    summary = summary_of(root)
    timing = json.loads((root / "metrics/train/time.json").read_text())
    validations = len((root / "metrics/train/plots/metrics/val/acc.tsv").read_text().strip().splitlines()) - 1
    assert summary["network_steps"] == len(lrs) > training.PACE_STEPS
    # Within the budget, give or take 5% or one validation pass (the stage's own start-up aside).
    assert seconds <= budget * 1.05 + timing["validate"] / validations, (seconds, timing)
    assert lrs[-1] == 0 and min(lrs[:-1]) > 0  # zero after the last step, and only then
    peak = lrs.index(max(lrs))  # the warm-up's end: a quarter of the first plan's steps, re-planned there
    assert len(lrs) / 6 <= peak <= len(lrs) / 3, (peak, len(lrs))
    falls = [a - b for a, b in zip(lrs[peak:], lrs[peak + 1:])]
    assert all(f > 0 for f in falls), lrs  # then down to zero (linearly between the epochs' re-plans)
    slopes = {round(f / lrs[peak], 9) for f in falls}
    assert len(slopes) <= validations + 1, slopes  # at most one new slope per epoch's re-plan


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_augmentation_policies_and_random_erasing_change_training_images_reproducibly(policy):
    from PIL import Image

    from stages.lib.data import train_transform
    from stages.lib.params import AugmentParams
    from stages.lib.preprocessing import Preprocessing

    prep = Preprocessing(64, 72, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    image = Image.open(PROJECT_ROOT / "tests/fixtures/ant_0.jpg").convert("RGB")

    def views(**augment):
        settings = {"crop_scale": (0.25, 1.0), "hflip": 0.5, "rotation": 0, "color_jitter": 0, "policy": "none",
                    "erasing": 0, **augment}
        transform = train_transform(prep, AugmentParams(**settings))
        out = []
        for seed in range(8):
            torch.manual_seed(seed)
            out.append(transform(image))
        return out

    plain, augmented = views(), views(policy=policy)
    assert all(v.shape == (3, 64, 64) for v in augmented)
    assert any(not torch.equal(a, b) for a, b in zip(plain, augmented))  # same crops, then the policy's operations
    assert all(torch.equal(a, b) for a, b in zip(augmented, views(policy=policy)))  # a seed gives the same images
    # With mean 0.5, no pixel k/255 normalises to exactly 0: exact zeros are erased pixels.
    assert all((v == 0).all(0).sum() == 0 for v in plain)
    assert all((v == 0).all(0).sum() > 0 for v in views(erasing=1.0))


def outputs_digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for folder in ("models", "metrics")
            for p in sorted((root / folder).rglob("*")) if p.is_file() and p.name != ".train.lock"}


LONG_FINETUNE = {"strategy": "finetune", "train": {"head_epochs": 1, "epochs": 40, "workers": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("through", ["python", "sh"])
def test_a_stage_dies_with_the_process_that_started_it(tiny_project, through):
    # DVC starts a stage itself (bash execs the command) or through `sh -c` (dash does not): kill -9
    # DVC, and the stage must stop at once, not write models/ and metrics/ for minutes.
    import psutil

    root = tiny_project(**LONG_FINETUNE)
    command = [sys.executable, "-m", "stages", "train"]
    if through == "sh":
        command = ["/bin/sh", "-c", " ".join(command)]
    starter = subprocess.Popen([sys.executable, "-c", f"import subprocess; subprocess.run({command!r})"], cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [p for p in psutil.Process(starter.pid).children(recursive=True) if "stages" in " ".join(p.cmdline())]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stage = next(p for p in psutil.Process(starter.pid).children(recursive=True) if "stages" in " ".join(p.cmdline()))
    workers_and_stage = [stage]
    training_started(root, starter)
    workers_and_stage += stage.children(recursive=True)  # the data loader's worker
    starter.kill()  # SIGKILL, as `kill -9` on dvc repro
    starter.wait()
    gone, alive = psutil.wait_procs(workers_and_stage, timeout=5)
    # A zombie has exited (an init that does not reap, as in some containers, leaves it listed)
    def still_running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    running = [p for p in alive if still_running(p)]
    assert not running, f"still running after the process that started it died: {running}"
    after = outputs_digest(root)
    time.sleep(2)
    assert outputs_digest(root) == after


@pytest.mark.slow
def test_a_second_training_is_refused_while_the_first_runs(tiny_project):
    root = tiny_project(**LONG_FINETUNE)
    first = subprocess.Popen([sys.executable, "-m", "stages", "train"], cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        training_started(root, first)
        second = subprocess.run([sys.executable, "-m", "stages", "train"], cwd=root, capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: models/train_state.pt: another process ({first.pid}) is writing it; wait for it to finish, "
            f"or stop it (kill {first.pid})"]
    finally:
        first.kill()
        first.wait()
    # Once the first is gone (even by SIGKILL), the lock is free (the next run resumes: the test above)
    from stages.lib.files import only_writer
    from stages.lib.paths import TRAIN_LOCK

    with only_writer(root / TRAIN_LOCK, "the lock after the first died"):
        pass


def test_a_temperature_is_fitted_only_on_enough_val_images(tiny_project, monkeypatch, caplog):
    from stages.lib import training
    from stages.lib.calibration import negative_log_likelihood, softmax
    from stages.lib.features import split_probabilities
    from stages.lib.index_table import read_split

    root = tiny_project(strategy="frozen")
    val_images = len(read_split("val"))
    caplog.set_level("INFO")
    train.main()
    assert read_checkpoint(root / "models/model.safetensors").temperature == 1.0
    assert (f"temperature kept at 1: the val split has {val_images} images, fewer than the "
            f"{training.MIN_VAL_IMAGES_FOR_TEMPERATURE} a fitted temperature needs") in caplog.text
    # With the floor at the tiny project's size, the temperature is fitted: the val NLL is no worse.
    monkeypatch.setattr(training, "MIN_VAL_IMAGES_FOR_TEMPERATURE", val_images)
    train.main()
    model = read_checkpoint(root / "models/model.safetensors")
    probs, labels = split_probabilities(model, "val", read_split("val"), 8, 0)
    log_probs = np.log(np.maximum(probs, 1e-12))
    assert 0.05 <= model.temperature <= 20 and model.temperature != 1.0
    assert negative_log_likelihood(softmax(log_probs / model.temperature), labels) <= \
        negative_log_likelihood(probs, labels)
    assert json.loads((root / "metrics/train/metrics.json").read_text())["temperature_fitted"] is True


def test_layer_decay_lowers_the_rate_of_early_layers_geometrically():
    from stages.lib.training import backbone_groups

    backbone = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)])  # 16 tensors, 2 per eighth
    backbone[0].bias.requires_grad_(False)
    groups = backbone_groups(backbone, 0.01, 0.1)
    rates = [g["lr"] for g in groups]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert np.allclose(np.diff(np.log10(rates)), -1 / 7)  # one step of 0.1 ** (1/7) per eighth, deepest first
    assert groups[0]["params"] == [backbone[7].weight, backbone[7].bias]
    assert groups[-1]["params"] == [backbone[0].weight]  # frozen weights are left out
    assert [g["lr"] for g in backbone_groups(backbone, 0.01, 1.0)] == [0.01] * 8


def test_omp_num_threads_caps_the_stage_threads_and_its_loader_workers(monkeypatch):
    from stages.lib.cores import cpu_threads
    from stages.lib.data import make_loader

    cores = len(os.sched_getaffinity(0))
    for value, expected in (("1", 1), ("3", 3), ("", cores), ("0", cores), ("many", cores)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert cpu_threads() == expected, value
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert make_loader(list(range(4)), 2, None, workers=4, pin_memory=False).num_workers == 1
    assert make_loader(list(range(4)), 2, None, workers=0, pin_memory=False).num_workers == 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert make_loader(list(range(4)), 2, None, workers=64, pin_memory=False).num_workers == cores
    # torch reads the variable itself: tests/test_pipeline.py's queued experiments train on 1 thread.


def test_the_head_trains_batch_by_batch_from_disk_as_from_memory(trained_copy, monkeypatch):
    from stages.lib import training
    from stages.lib.classifier import make_head
    from stages.lib.features import OnDisk, read_features
    from stages.lib.params import load_params
    from stages.lib.training import Run, fit_head, head_settings

    params = load_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"head_batch_size": 4})})
    read_rows = []
    real = OnDisk.__getitem__
    monkeypatch.setattr(OnDisk, "__getitem__",
                        lambda self, key: read_rows.append((self.path.stem, len(r := real(self, key)))) or r)
    monkeypatch.setattr(training, "READ_BATCHES", 2)  # the tiny split in several reads per epoch

    def trained(in_memory: bool) -> tuple[dict, list]:
        train, val = (read_features(split, in_memory=in_memory) for split in ("train", "val"))
        torch.manual_seed(0)
        head = make_head(train["features"].shape[-1], 2, "linear", 0, 0.2)
        run = Run(params, torch.device("cpu"), 2)
        epochs = [epoch.result.val_loss for epoch in fit_head(head, train, val, run, 1, head_settings(params))]
        return head.state_dict(), epochs

    on_disk, on_disk_losses = trained(False)
    items = len(read_features("train")["labels"]) * read_features("train")["features"].shape[1]
    reads_per_epoch = math.ceil(items / (2 * params.train.head_batch_size))
    assert reads_per_epoch > 1
    train_reads = [rows for split, rows in read_rows if split == "train"]
    # two batches a read, never the split, every epoch its batches anew
    assert max(train_reads) <= 2 * params.train.head_batch_size
    assert len(train_reads) == params.train.head_epochs * reads_per_epoch
    read_rows.clear()
    in_memory, in_memory_losses = trained(True)
    assert not read_rows
    assert on_disk_losses == in_memory_losses
    assert all(torch.equal(on_disk[name], in_memory[name]) for name in on_disk)


def test_the_head_trains_whole_epochs_up_to_head_max_steps_its_schedule_over_them():
    from dataclasses import replace

    from stages.lib.classifier import make_head
    from stages.lib.training import Run, fit_head, head_epochs_for, head_settings

    settings = head_settings(params_with_train(head_epochs=30, head_batch_size=32, head_max_steps=10_000))
    # hymenoptera, TrashNet and blood cells (plain and mirrored views) keep their 30 epochs
    assert [head_epochs_for(settings, 2 * images) for images in (245, 1516, 1200)] == [30, 30, 30]
    assert head_epochs_for(settings, 24_000) == 13  # 750 steps an epoch: 9,750 of the 10,000
    assert head_epochs_for(settings, 400_000) == 1  # never none
    assert head_epochs_for(replace(settings, epochs=4), 24_000) == 4

    split = random_feature_split(100, 2, 8)
    capped = params_with_train(head_epochs=30, head_batch_size=10, head_max_steps=45, scheduler="cosine")
    torch.manual_seed(0)
    epochs = [epoch.result for epoch in fit_head(make_head(8, 2, "linear", 0, 0.2), split, split,
                                                  Run(capped, torch.device("cpu"), 2), 1, head_settings(capped))]
    assert [e.epoch for e in epochs] == [1, 2]  # 20 steps an epoch: two fit in 45
    # the cosine spans the two epochs, not thirty: halfway down at the second
    assert epochs[1].lr == pytest.approx(capped.train.lr / 2)


def test_the_head_trains_on_one_torch_thread_so_its_bits_do_not_depend_on_the_cores(monkeypatch):
    from stages.lib import training
    from stages.lib.classifier import make_head

    params = params_with_train(head_epochs=2)
    # Six classes of 256 numbers: on this torch, a head trained on two threads rounds differently
    # from one trained on one (measured: the weights differ from the first epoch on).
    split = random_feature_split(200, 6, 256)
    threads_seen = []
    real_step = training.Optimization.step
    monkeypatch.setattr(training.Optimization, "step",
                        lambda self, loss: (threads_seen.append(torch.get_num_threads()), real_step(self, loss)))

    def trained() -> tuple[dict, list]:
        torch.manual_seed(0)
        head = make_head(256, 6, "linear", 0, 0.2)
        run = training.Run(params, torch.device("cpu"), 6)
        scores = [e.result for e in training.fit_head(head, split, split, run, 1, training.head_settings(params))]
        return head.state_dict(), scores

    before = torch.get_num_threads()
    heads = {}
    try:
        for stage_threads in (2, 1):
            torch.set_num_threads(stage_threads)
            threads_seen.clear()
            heads[stage_threads] = trained()
            assert set(threads_seen) == {1} and torch.get_num_threads() == stage_threads  # and back after
    finally:
        torch.set_num_threads(before)
    assert heads[1][1] == heads[2][1]
    assert all(torch.equal(heads[1][0][name], heads[2][0][name]) for name in heads[2][0])
    # The control: without the cap, the same head on two threads and on one is not the same bits.
    monkeypatch.setattr(training, "one_torch_thread", contextlib.nullcontext)
    uncapped = {}
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            uncapped[threads] = trained()[0]
    finally:
        torch.set_num_threads(before)
    assert not all(torch.equal(uncapped[1][name], uncapped[2][name]) for name in uncapped[2])
