"""A training run's records: every epoch (DVCLive), the best one (models/model.safetensors, written
atomically each time it improves) and the state an interrupted run resumes from."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stages.lib.checkpoint import Checkpoint, checkpoint_from_dict, save_checkpoint
from stages.lib.classifier import head_config
from stages.lib.files import file_sha256, save_torch_atomic
from stages.lib.params import Params
from stages.lib.paths import MODEL, TRAIN_STATE
from stages.lib.preprocessing import Preprocessing

log = logging.getLogger("train")

# The params the train stage declares in dvc.yaml: what a checkpoint records and a resume state
# is fingerprinted with (tests/test_dvc_yaml.py checks that the stage reads no other).
TRAIN_SECTIONS = ("strategy", "model", "augment", "train")


def train_params(params: Params) -> dict:
    sections = {name: getattr(params, name) for name in TRAIN_SECTIONS}
    return {name: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
            for name, value in sections.items()}


@dataclass
class EpochResult:
    """An epoch's scores: what the logs, the plots and the checkpoint record."""
    epoch: int  # counted across phases, from 1
    phase: str  # "head" (on cached features) or "network"
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_f1: float  # macro-F1
    lr: float

    def score(self, select_on: str) -> float:
        return self.val_f1 if select_on == "macro_f1" else self.val_acc

    def beats(self, other: "EpochResult | None", select_on: str = "accuracy") -> bool:
        """A better val score (train.select_on), ties broken by lower val loss."""
        return other is None or (self.score(select_on), -self.val_loss) > (other.score(select_on), -other.val_loss)


@dataclass
class Epoch:
    """What a phase hands over per epoch: its scores, and for the network phase the state to resume
    from and which val images it got right (strategy auto compares them with the head's)."""
    result: EpochResult
    resume_state: dict | None = None  # optimizer, scheduler and scaler after this epoch
    val_right: list[bool] | None = None


class Records:
    """Logs every epoch (DVCLive, when `live` is given), keeps the best one (models/model.safetensors) and
    leaves a state to resume from (models/train_state.pt).

    Under torchrun every process keeps the same records; only the first (`writes`) writes files.
    `model` arguments are training.ModelParts: the head, and the backbone or its pretrained state.
    """

    def __init__(self, params: Params, classes: list[str], prep: Preprocessing, pretrained_sha256: str,
                 timing: Counter, live=None, fingerprint: str = "", writes: bool = True):
        self.timing = timing  # the run's seconds per kind of work, kept across a resume
        self.params, self.classes, self.prep, self.pretrained_sha256 = params, classes, prep, pretrained_sha256
        self.live, self.writes, self.fingerprint = live, writes, fingerprint
        self.history: list[EpochResult] = []
        self.best: EpochResult | None = None
        self.best_state: dict | None = None  # the best epoch's state while it is not yet on disk
        self.best_checkpoint: Checkpoint | None = None  # what models/model.safetensors holds
        self.head_val_right: list[bool] | None = None  # per val image, right under the head phase's best

    def checkpoint(self, state_dict: dict, best: EpochResult) -> Checkpoint:
        # While the best epoch is a head epoch, the backbone is still exactly the pretrained file's;
        # a network epoch was validated at train.eval_size, and is scored at it from then on.
        head = best.phase == "head"
        pretrained = self.pretrained_sha256 if head else None
        prep = self.prep if head else self.prep.at_size(self.params.train.eval_size)
        return Checkpoint(
            backbone=self.params.model.backbone, weights=self.params.model.weights, strategy=self.params.strategy,
            classes=self.classes, preprocessing=prep, head=head_config(self.params.model),
            tta=self.params.model.tta, epoch=best.epoch, metrics=asdict(best), pretrained_backbone_sha256=pretrained,
            params=train_params(self.params), state_dict=state_dict,
        )

    def log_epoch(self, result: EpochResult) -> None:
        if self.live is None:
            return
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1"):
            self.live.log_metric(name.replace("_", "/", 1), getattr(result, name))
        self.live.log_metric("lr", result.lr)
        self.live.next_step()

    def record(self, result: EpochResult, model, eligible: bool = True) -> None:
        """Log an epoch; it becomes the best if it beats the best so far and is `eligible`
        (strategy auto: a network epoch with more val images right than the head)."""
        self.history.append(result)
        self.log_epoch(result)
        improved = eligible and result.beats(self.best, self.params.train.select_on)
        note = " | best so far" if improved else "" if eligible else " | no more val images right than the head"
        log.info("epoch %d (%s): train loss %.4f acc %.3f | val loss %.4f acc %.3f f1 %.3f | lr %.2e%s",
                 result.epoch, result.phase, result.train_loss, result.train_acc, result.val_loss, result.val_acc,
                 result.val_f1, result.lr, note)
        if improved:
            self.best, self.best_state = result, model.state_dict()
            # Head epochs take milliseconds: their best is written once, when the phase ends.
            if result.phase == "network":
                self.save_best()

    def save_best(self) -> None:
        """Write the best epoch so far to models/model.safetensors, atomically, unless it is there already."""
        if self.best is not None and self.best_state is not None:
            self.best_checkpoint = self.checkpoint(self.best_state, self.best)
            if self.writes:
                save_checkpoint(MODEL, self.best_checkpoint)
            self.best_state = None

    def restore_best(self, model) -> None:
        self.save_best()
        if self.best_checkpoint is not None:
            model.load_state_dict(self.best_checkpoint.state_dict)

    def save_resume_state(self, model, network: dict | None = None, complete: bool = False) -> None:
        self.save_best()
        if not self.writes:
            return
        state = {"fingerprint": self.fingerprint, "complete": complete}
        if not complete:
            state.update(history=[asdict(r) for r in self.history], best_checkpoint=self.best_checkpoint.to_dict(),
                         model=model.state_dict(), network=network, rng=torch.get_rng_state(),
                         timing=dict(self.timing), head_val_right=self.head_val_right)
        save_torch_atomic(TRAIN_STATE, state)

    def resume(self, state: dict) -> None:
        """Take over an interrupted run's history, best epoch and timing; the caller restores the
        model from state["model"], the network phase from state["network"] and torch's random
        generator from state["rng"] where the interrupted run saved it."""
        self.history = [EpochResult(**r) for r in state["history"]]
        for result in self.history:
            self.log_epoch(result)
        self.best_checkpoint = checkpoint_from_dict(state["best_checkpoint"], TRAIN_STATE)
        self.best = EpochResult(**self.best_checkpoint.metrics)
        if self.writes:
            save_checkpoint(MODEL, self.best_checkpoint)
        self.timing.update(state["timing"])
        self.head_val_right = state.get("head_val_right")
        log.info("resuming an interrupted run after epoch %d (best so far: epoch %d)",
                 self.history[-1].epoch, self.best.epoch)


def run_fingerprint(params: Params, inputs: list[Path], known_sha256: dict[Path, str] | None = None) -> str:
    """What a run's result depends on: its params, and the content of its input files (hashed
    here unless `known_sha256` has them)."""
    known_sha256 = known_sha256 or {}
    digest = hashlib.sha256(json.dumps(train_params(params), sort_keys=True).encode())
    for path in inputs:
        sha256 = known_sha256.get(path) or (file_sha256(path) if path.is_file() else "missing")
        digest.update(f"{path}:{sha256}".encode())
    return digest.hexdigest()


def read_resume_state(fingerprint: str) -> dict | None:
    """The state an interrupted run left, if it is one of the same params and inputs."""
    if not TRAIN_STATE.is_file():
        return None
    try:
        state = torch.load(TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable state only means starting afresh
        log.info("%s unreadable (%s): starting afresh", TRAIN_STATE, type(error).__name__)
        return None
    if state.get("complete"):
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("%s is from a run with other params or inputs: starting afresh", TRAIN_STATE)
        return None
    return state
