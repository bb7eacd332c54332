"""Stage `train`: fit a classifier on the train split, pick the best epoch on the val split.

Strategies (the top-level param `strategy`):
- frozen:   the pretrained backbone is never touched; the new head trains on cached features;
- finetune: that head first (`train.head_epochs`, 0 to skip it as the recipe does), then every
            layer, the backbone at `train.lr * train.backbone_lr_mult`;
- scratch:  the same architecture from random weights, every layer from the start.

The best epoch by val accuracy (ties: lower val loss) is written to models/model.pt each time it
improves, atomically, so an interrupted run leaves the last good checkpoint. The test split is
never read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from stages.cli import UserError, run_stage
from stages.data import (EpochSampler, ImageDataset, decode_size, eval_transform, make_loader, read_classes,
                         read_split, train_transform)
from stages.files import file_sha256, save_torch_atomic, write_json_atomic
from stages.models import (Classifier, Preprocessing, build_classifier, head_config, make_head, pick_device,
                           read_pretrained_and_sha256)
from stages.params import Params, TrainParams, load_params
from stages.paths import INDEX_CSV, MODEL, PRETRAINED, TRAIN_STATE, features_file
from stages.plots import save_learning_curves
from stages.predict import autocast, evaluate, head_probabilities, summarize, to_device

log = logging.getLogger("train")

LIVE_DIR = Path("metrics/train")
CURVES_PNG = LIVE_DIR / "learning_curves.png"
TIME_JSON = LIVE_DIR / "time.json"  # seconds per kind of work; not in metrics.json, which is reproducible


@dataclass
class EpochResult:
    epoch: int  # counted across phases, from 1
    phase: str  # "head" (on cached features) or "network"
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float

    def beats(self, other: "EpochResult | None") -> bool:
        return other is None or (self.val_acc, -self.val_loss) > (other.val_acc, -other.val_loss)


# --- optimisation ----------------------------------------------------------------------------

def build_optimizer(groups: list[dict], params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=params.momentum, weight_decay=params.weight_decay)
    if params.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=params.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay)


def one_cycle(total: int, warmup: float = 0.25, start: float = 0.04):
    """The one-cycle shape as a factor of each group's lr: linear warm-up from `start` over the
    first quarter, then cosine annealing to zero. torch's OneCycleLR divides by zero on runs of a
    few steps, which tiny datasets produce."""
    warm = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return start + (1 - start) * step / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int, epochs: int):
    """A scheduler stepped once per batch."""
    total = steps_per_epoch * epochs
    if params.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, params.step_size * steps_per_epoch, params.gamma)
    if params.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if params.scheduler == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer, scheduler, criterion, device: torch.device,
                    epoch: int, amp: bool = False, channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True,
                    timing: Counter | None = None) -> tuple[float, float]:
    """One pass over `loader`; returns mean loss and accuracy. Stops on a non-finite loss.

    With `timing`, adds the seconds spent waiting for batches ("data") and the rest ("compute"):
    if data is more than a sliver, the loader does not keep up (more workers, smaller images).
    """
    total_loss = correct = seen = 0
    timing = Counter() if timing is None else timing
    # disable=None: a bar on a terminal, none in CI logs.
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if progress else True)
    waited_from = time.perf_counter()
    for inputs, labels in bar:
        computing_from = time.perf_counter()
        timing["data"] += computing_from - waited_from
        inputs, labels = to_device(inputs, device, channels_last), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(inputs)
            loss = criterion(logits.float(), labels)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise UserError(f"epoch {epoch}: the loss became {loss.item()}; lower train.lr (the learning rate was {lr:.3g})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        waited_from = time.perf_counter()
        timing["compute"] += waited_from - computing_from
    total_loss, correct, seen = sum_over_processes(total_loss, correct, seen)
    return total_loss / seen, correct / seen


# --- several processes (torchrun) --------------------------------------------------------------

def start_distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs,
    gloo on CPUs; else (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world_size


def sum_over_processes(*values: float) -> list[float]:
    """Each value summed over every process (itself alone when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


# --- the two phases --------------------------------------------------------------------------

def read_features(split: str) -> dict:
    path = features_file(split)
    if not path.is_file():
        raise UserError(f"{path}: not found; run the features stage first (dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)


def shuffled_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """One epoch of shuffled batches sliced from tensors in memory: a DataLoader would index and
    collate every sample one by one, which costs more than the head's training itself."""
    order = torch.randperm(len(labels), generator=generator)
    return [(inputs[i], labels[i]) for i in order.split(batch_size)]


def fit_head_on_features(head: nn.Module, train: dict, val: dict, params: Params, criterion, first_epoch: int,
                         timing: Counter):
    """Train the head on cached backbone features; yields (EpochResult, None) per epoch: head
    epochs take milliseconds, so an interrupted head phase starts over rather than resuming."""
    views = train["features"].shape[1]
    inputs = train["features"].flatten(0, 1)
    labels = train["labels"].repeat_interleave(views)
    generator = torch.Generator().manual_seed(params.train.seed)
    batch_size = params.train.head_batch_size
    optimizer = build_optimizer([{"params": head.parameters(), "lr": params.train.lr}], params.train)
    scheduler = build_scheduler(optimizer, params.train, math.ceil(len(labels) / batch_size), params.train.head_epochs)
    for i in range(params.train.head_epochs):
        epoch = first_epoch + i
        started = time.perf_counter()
        head.train()
        lr = optimizer.param_groups[0]["lr"]
        # An epoch on cached features takes a fraction of a second: no progress bar.
        train_loss, train_acc = train_one_epoch(head, shuffled_batches(inputs, labels, batch_size, generator), optimizer,
                                                scheduler, criterion, torch.device("cpu"), epoch, progress=False)
        probs = head_probabilities(head, val, params.evaluate.tta)
        timing["head"] += time.perf_counter() - started
        yield EpochResult(epoch, "head", train_loss, train_acc, *summarize(probs, val["labels"]), lr), None


def keep_batchnorm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode: with a few hundred images and small batches, batch
    statistics are noisy, and the pretrained running statistics are what the head was fit to."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def fit_network(model: Classifier, params: Params, prep: Preprocessing, device: torch.device, criterion,
                first_epoch: int, backbone_lr: float, head_lr: float, timing: Counter, resume: dict | None = None,
                rank: int = 0, world_size: int = 1):
    """Train every layer on images; yields (EpochResult, state to resume from) per epoch.

    `resume` is such a state: the optimizer, scheduler and scaler continue where they were, and
    the epochs already done are skipped (each epoch's order and augmentations depend only on the
    seed and its number, so the rest runs as it would have)."""
    p = params.train
    pin = device.type == "cuda"
    train_set = ImageDataset(read_split("train"), train_transform(prep, params.augment), decode_size(prep, True), p.seed)
    val_set = ImageDataset(read_split("val"), eval_transform(prep), decode_size(prep))
    # Under torchrun each process takes its share of every epoch; train.batch_size is per process.
    train_sampler = EpochSampler(len(train_set), shuffle=True, seed=p.seed, rank=rank, world_size=world_size)
    train_loader = make_loader(train_set, p.batch_size, train_sampler, p.workers, pin, p.seed)
    val_loader = make_loader(val_set, params.evaluate.batch_size, None, p.workers, pin, p.seed)
    groups = [{"params": model.backbone.parameters(), "lr": backbone_lr}, {"params": model.head.parameters(), "lr": head_lr}]
    optimizer = build_optimizer(groups, p)
    scheduler = build_scheduler(optimizer, p, len(train_loader), p.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=p.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    done = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        done = resume["epochs_done"]
    runner = model
    if world_size > 1:
        # Gradients are averaged across processes after each backward pass.
        runner = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if p.compile:
        runner = torch.compile(runner)
    for i in range(done, p.epochs):
        epoch = first_epoch + i
        train_sampler.set_epoch(i)
        runner.train()
        if p.freeze_bn:
            keep_batchnorm_statistics(model.backbone)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            runner, train_loader, optimizer, scheduler, criterion, device, epoch, p.amp, p.channels_last, scaler,
            timing=timing,
        )
        started = time.perf_counter()
        # Every process scores the whole val split with the same weights, so all agree on the best
        # epoch; DDP's wrapper is for training only.
        val_loss, val_acc = evaluate(model, val_loader, device, params.evaluate.tta, p.amp, p.channels_last)
        timing["validate"] += time.perf_counter() - started
        state = {"epochs_done": i + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict()}
        yield EpochResult(epoch, "network", train_loss, train_acc, val_loss, val_acc, lr), state


# --- the stage -------------------------------------------------------------------------------

def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so both stop the same clean way."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def checkpoint(state_dict: dict, params: Params, classes: list[str], prep: Preprocessing, best: EpochResult,
               pretrained_sha256: str) -> dict:
    """A self-describing checkpoint: it rebuilds and preprocesses without params.yaml.

    `pretrained_sha256` names the weights file the backbone started from; while the best epoch is
    a head epoch, the backbone is still exactly that file's, so its cached features apply.
    """
    return {
        "backbone": params.model.backbone,
        "weights": params.model.weights,
        "strategy": params.strategy,
        "classes": classes,
        "preprocessing": prep.to_dict(),
        "head": head_config(params.model),
        "params": params.model_dump(mode="json"),
        "epoch": best.epoch,
        "metrics": asdict(best),
        "pretrained_sha256": pretrained_sha256,
        "state_dict": state_dict,
    }


def prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in state.items()}


def unprefixed(prefix: str, state: dict) -> dict:
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


class Trainer:
    """Runs the phases a strategy asks for, logs every epoch, keeps the best one, and leaves a
    state to resume from after each network epoch.

    Until a network phase attaches the whole model, only the head exists: the backbone is the
    pretrained state, saved as it is, so a frozen run never builds (or imports) the backbone.
    """

    def __init__(self, params: Params, classes: list[str], prep: Preprocessing, live: Live | None,
                 pretrained: dict | None, pretrained_sha256: str, fingerprint: str = ""):
        # Under torchrun every process keeps the same books; only the first (with `live`) writes.
        self.params, self.classes, self.prep, self.live = params, classes, prep, live
        self.writes = live is not None
        self.pretrained, self.pretrained_sha256, self.fingerprint = pretrained, pretrained_sha256, fingerprint
        self.head: nn.Module | None = None
        self.backbone: nn.Module | None = None
        self.best: EpochResult | None = None
        self.best_state: dict | None = None  # the best epoch's state while it is not yet on disk
        self.best_checkpoint: dict | None = None  # what models/model.pt holds
        self.history: list[EpochResult] = []
        self.timing: Counter = Counter()  # seconds: head, data, compute, validate

    def state_dict(self) -> dict:
        """The classifier's state dict, keys as in `Classifier`."""
        backbone = self.backbone.state_dict() if self.backbone is not None else self.pretrained
        return {**prefixed("backbone", backbone), **prefixed("head", self.head.state_dict())}

    def run(self, epochs) -> None:
        """Consume a phase's (result, resume state) pairs, stopping early after `train.patience`
        epochs without progress."""
        stale = 0
        for result, state in epochs:
            self.record(result)
            if state is not None:
                self.save_resume_state(network=state)
            stale = 0 if result is self.best else stale + 1
            if self.params.train.patience and stale >= self.params.train.patience:
                log.info("no better val score for %d epochs: stopping this phase early", stale)
                return

    def log_epoch(self, result: EpochResult) -> None:
        if self.live is None:
            return
        for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
            self.live.log_metric(name.replace("_", "/", 1), getattr(result, name))
        self.live.log_metric("lr", result.lr)
        self.live.next_step()

    def record(self, result: EpochResult) -> None:
        self.history.append(result)
        self.log_epoch(result)
        improved = result.beats(self.best)
        log.info("epoch %d (%s): train loss %.4f acc %.3f | val loss %.4f acc %.3f | lr %.2e%s",
                 result.epoch, result.phase, result.train_loss, result.train_acc, result.val_loss, result.val_acc,
                 result.lr, " | best so far" if improved else "")
        if improved:
            self.best, self.best_state = result, self.state_dict()
            # Head epochs take milliseconds: their best is written once, when the phase ends.
            if result.phase == "network":
                self.save_best()

    def save_best(self) -> None:
        """Write the best epoch so far to models/model.pt, atomically, unless it is there already."""
        if self.best is not None and self.best_state is not None:
            self.best_checkpoint = checkpoint(self.best_state, self.params, self.classes, self.prep, self.best,
                                              self.pretrained_sha256)
            if self.writes:
                save_torch_atomic(MODEL, self.best_checkpoint)
            self.best_state = None

    def restore_best(self) -> None:
        self.save_best()
        if self.best_checkpoint is not None:
            state = self.best_checkpoint["state_dict"]
            self.head.load_state_dict(unprefixed("head", state))
            if self.backbone is not None:
                self.backbone.load_state_dict(unprefixed("backbone", state))

    # --- resuming ----------------------------------------------------------------------------
    # DVC deletes a stage's outputs before running it, except persistent ones: models/train_state.pt
    # is one (dvc.yaml), so a run killed by SIGKILL or a power cut finds it when `dvc repro` runs
    # again, and continues after its last completed epoch if params and inputs are the same.

    def save_resume_state(self, network: dict | None = None, complete: bool = False) -> None:
        self.save_best()
        if not self.writes:
            return
        state = {"fingerprint": self.fingerprint, "complete": complete}
        if not complete:
            state.update(history=[asdict(r) for r in self.history], best_checkpoint=self.best_checkpoint,
                         model=self.state_dict(), network=network, rng=torch.get_rng_state(),
                         timing=dict(self.timing))
        save_torch_atomic(TRAIN_STATE, state)

    def resume(self, state: dict) -> None:
        """Take over an interrupted run's history, best epoch and timing; the caller restores the
        model from state["model"], the network phase from state["network"] and torch's random
        generator from state["rng"] where the interrupted run saved it."""
        self.history = [EpochResult(**r) for r in state["history"]]
        for result in self.history:
            self.log_epoch(result)
        self.best_checkpoint = state["best_checkpoint"]
        self.best = EpochResult(**self.best_checkpoint["metrics"])
        if self.writes:
            save_torch_atomic(MODEL, self.best_checkpoint)
        self.timing.update(state["timing"])
        log.info("resuming an interrupted run after epoch %d (best so far: epoch %d)",
                 self.history[-1].epoch, self.best.epoch)


def run_fingerprint(params: Params, inputs: list[Path], known_sha256: dict[Path, str] | None = None) -> str:
    """What a run's result depends on: every param, and the content of its input files (hashed
    here unless `known_sha256` has them)."""
    known_sha256 = known_sha256 or {}
    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
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


def learning_rates(params: Params, warm_head: bool) -> tuple[float, float]:
    """(backbone, head) learning rates of the network phase."""
    lr, mult = params.train.lr, params.train.backbone_lr_mult
    if params.strategy == "scratch":
        return lr, lr
    # A head trained on the features first should move as gently as the backbone under it.
    return (lr * mult, lr * mult) if warm_head else (lr * mult, lr)


def write_timing(trainer: Trainer, started: float) -> None:
    seconds = {name: round(value, 2) for name, value in sorted(trainer.timing.items())}
    write_json_atomic(TIME_JSON, {**seconds, "total": round(time.perf_counter() - started, 2)})


def read_head_features(pretrained_sha256: str) -> tuple[dict, dict]:
    train, val = read_features("train"), read_features("val")
    if train["pretrained_sha256"] != pretrained_sha256:
        raise UserError(f"{features_file('train')}: computed with other pretrained weights than {PRETRAINED}; "
                        "run dvc repro to bring the features stage up to date")
    return train, val


def head_phase(trainer: Trainer, criterion, resumed: dict | None) -> None:
    """A new head on the cached features; or, resuming, the head the interrupted run left."""
    params = trainer.params
    train_features, val_features = read_head_features(trainer.pretrained_sha256)
    width = train_features["features"].shape[-1]
    trainer.head = make_head(width, len(trainer.classes), **head_config(params.model))
    if resumed is not None:
        trainer.resume(resumed)
        trainer.head.load_state_dict(unprefixed("head", resumed["model"]))
        return
    trainer.run(fit_head_on_features(trainer.head, train_features, val_features, params, criterion, 1, trainer.timing))
    trainer.restore_best()
    trainer.save_resume_state()


def network_phase(trainer: Trainer, device: torch.device, criterion, warm_head: bool, resumed: dict | None,
                  rank: int, world_size: int) -> None:
    """Every layer on the images, from the warm head, the pretrained backbone or random weights."""
    params = trainer.params
    # Called here, not at the start: it takes 2 s, and the head phase needs none of it.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if resumed is not None and resumed["network"] is None:
        torch.set_rng_state(resumed["rng"])  # as it was when the head phase ended
    model = build_classifier(params.model.backbone, len(trainer.classes), head_config(params.model))
    if params.strategy != "scratch":
        model.backbone.load_state_dict(trainer.pretrained)
    if warm_head:
        model.head = trainer.head
    if resumed is not None:
        if not warm_head:
            trainer.resume(resumed)
        model.load_state_dict(resumed["model"])
    trainer.head, trainer.backbone = model.head, model.backbone
    model.to(device)
    if params.train.channels_last:
        model.to(memory_format=torch.channels_last)
    first_epoch = (params.train.head_epochs if warm_head else 0) + 1
    if resumed is not None and resumed["network"] is not None:
        torch.set_rng_state(resumed["rng"])  # as it was after the last completed epoch
    trainer.run(fit_network(model, params, trainer.prep, device, criterion, first_epoch,
                            *learning_rates(params, warm_head), trainer.timing,
                            resumed["network"] if resumed is not None else None, rank, world_size))


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    rank, world_size = start_distributed()
    torch.manual_seed(params.train.seed)
    stop_on_sigterm()
    device = pick_device()
    classes = read_classes()
    pretrained, pretrained_sha256 = read_pretrained_and_sha256(PRETRAINED)
    if params.strategy != "scratch" and pretrained["state_dict"] is None:
        raise UserError(f"params.yaml: strategy {params.strategy} needs pretrained weights, but model.weights is none; "
                        "use strategy scratch or set model.weights")
    prep = Preprocessing.from_dict(pretrained["preprocessing"])
    criterion = nn.CrossEntropyLoss(label_smoothing=params.train.label_smoothing)
    warm_head = params.strategy == "frozen" or (params.strategy == "finetune" and params.train.head_epochs > 0)
    log.info("strategy %s, backbone %s, %d classes, device %s", params.strategy, params.model.backbone, len(classes), device)
    fingerprint = run_fingerprint(params, [PRETRAINED, INDEX_CSV, features_file("train"), features_file("val")],
                                  {PRETRAINED: pretrained_sha256})
    resumed = read_resume_state(fingerprint)

    if world_size > 1:
        log.info("process %d of %d", rank, world_size)
    with (Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False) if rank == 0 else nullcontext()) as live:
        trainer = Trainer(params, classes, prep, live, pretrained["state_dict"], pretrained_sha256, fingerprint)
        try:
            if warm_head:
                head_phase(trainer, criterion, resumed)
            if params.strategy != "frozen":
                network_phase(trainer, device, criterion, warm_head, resumed, rank, world_size)
        except KeyboardInterrupt:
            trainer.save_best()
            log.error("interrupted: %s keeps the best epoch so far (%s)", MODEL,
                      trainer.best.epoch if trainer.best else "none yet")
            sys.exit(130)
        trainer.save_best()
        best = trainer.best
        if live is not None:
            live.summary["best"] = asdict(best)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return
    save_learning_curves(trainer.history, best.epoch, CURVES_PNG)
    write_timing(trainer, started)
    trainer.save_resume_state(complete=True)
    log.info("best epoch %d (%s): val acc %.4f, val loss %.4f", best.epoch, best.phase, best.val_acc, best.val_loss)


if __name__ == "__main__":
    run_stage(main)
