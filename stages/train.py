"""Stage `train`: fit a classifier on the train split, pick the best epoch on the val split.

Strategies (the top-level param `strategy`):
- frozen:   the pretrained backbone is never touched; the new head trains on cached features;
- gradual:  that head first, then every layer at `train.lr * train.backbone_lr_mult`;
- finetune: every layer from the start, the backbone at the lower learning rate;
- scratch:  the same architecture from random weights.

The best epoch by val accuracy (ties: lower val loss) is written to models/model.pt each time it
improves, atomically, so an interrupted run leaves the last good checkpoint. The test split is
never read here.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from stages.cli import UserError, run_stage
from stages.data import ImageDataset, decode_size, eval_transform, make_loader, read_classes, read_split, train_transform
from stages.features import FEATURES
from stages.files import save_torch_atomic
from stages.models import Classifier, Preprocessing, build_classifier, head_config, pick_device
from stages.params import Params, TrainParams, load_params
from stages.plots import save_learning_curves
from stages.weights import PRETRAINED

log = logging.getLogger("train")

MODEL = Path("models/model.pt")
LIVE_DIR = Path("metrics/train")
CURVES_PNG = LIVE_DIR / "learning_curves.png"


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


# --- shared metric helpers (the evaluate stage uses them too) --------------------------------

def summarize(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy of predicted probabilities."""
    loss = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def autocast(device: torch.device, amp: bool):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision elsewhere.

    CPUs without native bf16 run autocast slower than fp32, so the CPU path stays fp32.
    """
    if not amp or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    format_ = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=format_)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
            channels_last: bool = False, desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels over a loader; with tta=hflip, averaged with the mirror image."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images = to_device(images, device, channels_last)
        with autocast(device, amp):
            probs = model(images).float().softmax(1)
            if tta == "hflip":
                probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
        all_probs.append(probs.cpu())
        all_labels.append(labels)
    return torch.cat(all_probs), torch.cat(all_labels)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, tta: str, amp: bool = False,
             channels_last: bool = False) -> tuple[float, float]:
    return summarize(*predict(model, loader, device, tta, amp, channels_last, desc="validating"))


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


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, criterion, device: torch.device,
                    epoch: int, amp: bool = False, channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True) -> tuple[float, float]:
    """One pass over `loader`; returns mean loss and accuracy. Stops on a non-finite loss."""
    total_loss = correct = seen = 0
    # disable=None: a bar on a terminal, none in CI logs.
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if progress else True)
    for inputs, labels in bar:
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
    return total_loss / seen, correct / seen


# --- the two phases --------------------------------------------------------------------------

def fit_head_on_features(head: nn.Module, features: dict, params: Params, criterion, first_epoch: int):
    """Train the head on cached backbone features; yields one EpochResult per epoch."""
    train = features["train"]
    views = train["features"].shape[1]
    inputs = train["features"].flatten(0, 1)
    labels = train["labels"].repeat_interleave(views)
    generator = torch.Generator().manual_seed(params.train.seed)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=params.train.batch_size, shuffle=True, generator=generator)
    optimizer = build_optimizer([{"params": head.parameters(), "lr": params.train.lr}], params.train)
    scheduler = build_scheduler(optimizer, params.train, len(loader), params.train.head_epochs)
    val = features["val"]
    for i in range(params.train.head_epochs):
        epoch = first_epoch + i
        head.train()
        lr = optimizer.param_groups[0]["lr"]
        # An epoch on cached features takes a fraction of a second: no progress bar.
        train_loss, train_acc = train_one_epoch(head, loader, optimizer, scheduler, criterion, torch.device("cpu"), epoch,
                                                progress=False)
        head.eval()
        with torch.inference_mode():
            probs = head(val["features"][:, 0]).softmax(1)
            if params.evaluate.tta == "hflip":
                probs = (probs + head(val["features"][:, 1]).softmax(1)) / 2
        yield EpochResult(epoch, "head", train_loss, train_acc, *summarize(probs, val["labels"]), lr)


def keep_batchnorm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode: with a few hundred images and small batches, batch
    statistics are noisy, and the pretrained running statistics are what the head was fit to."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def fit_network(model: Classifier, params: Params, prep: Preprocessing, device: torch.device, criterion,
                first_epoch: int, backbone_lr: float, head_lr: float):
    """Train every layer on images; yields one EpochResult per epoch."""
    p = params.train
    pin = device.type == "cuda"
    train_set = ImageDataset(read_split("train"), train_transform(prep, params.augment), decode_size(prep))
    val_set = ImageDataset(read_split("val"), eval_transform(prep), decode_size(prep))
    train_loader = make_loader(train_set, p.batch_size, True, p.workers, p.seed, pin)
    val_loader = make_loader(val_set, params.evaluate.batch_size, False, p.workers, p.seed, pin)
    groups = [{"params": model.backbone.parameters(), "lr": backbone_lr}, {"params": model.head.parameters(), "lr": head_lr}]
    optimizer = build_optimizer(groups, p)
    scheduler = build_scheduler(optimizer, p, len(train_loader), p.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=p.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    runner = torch.compile(model) if p.compile else model
    for i in range(p.epochs):
        epoch = first_epoch + i
        runner.train()
        if p.freeze_bn:
            keep_batchnorm_statistics(model.backbone)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            runner, train_loader, optimizer, scheduler, criterion, device, epoch, p.amp, p.channels_last, scaler
        )
        val_loss, val_acc = evaluate(runner, val_loader, device, params.evaluate.tta, p.amp, p.channels_last)
        yield EpochResult(epoch, "network", train_loss, train_acc, val_loss, val_acc, lr)


# --- the stage -------------------------------------------------------------------------------

def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so both stop the same clean way."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def checkpoint(model: Classifier, params: Params, classes: list[str], prep: Preprocessing, best: EpochResult) -> dict:
    """A self-describing checkpoint: it rebuilds and preprocesses without params.yaml."""
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
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


class Trainer:
    """Runs the phases a strategy asks for, logs every epoch and keeps the best one."""

    def __init__(self, model: Classifier, params: Params, classes: list[str], prep: Preprocessing, live: Live):
        self.model, self.params, self.classes, self.prep, self.live = model, params, classes, prep, live
        self.best: EpochResult | None = None
        self.history: list[EpochResult] = []

    def run(self, epochs) -> None:
        """Consume a phase's epochs, stopping early after `train.patience` epochs without progress."""
        stale = 0
        for result in epochs:
            self.record(result)
            stale = 0 if result is self.best else stale + 1
            if self.params.train.patience and stale >= self.params.train.patience:
                log.info("no better val score for %d epochs: stopping this phase early", stale)
                return

    def record(self, result: EpochResult) -> None:
        self.history.append(result)
        for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
            self.live.log_metric(name.replace("_", "/", 1), getattr(result, name))
        self.live.log_metric("lr", result.lr)
        self.live.next_step()
        improved = result.beats(self.best)
        log.info("epoch %d (%s): train loss %.4f acc %.3f | val loss %.4f acc %.3f | lr %.2e%s",
                 result.epoch, result.phase, result.train_loss, result.train_acc, result.val_loss, result.val_acc,
                 result.lr, " | best so far, saved" if improved else "")
        if improved:
            self.best = result
            save_torch_atomic(MODEL, checkpoint(self.model, self.params, self.classes, self.prep, result))

    def restore_best(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True)["state_dict"])


def main() -> None:
    params = load_params()
    torch.manual_seed(params.train.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    stop_on_sigterm()
    device = pick_device()
    classes = read_classes()
    pretrained = torch.load(PRETRAINED, map_location="cpu", weights_only=True)
    prep = Preprocessing.from_dict(pretrained["preprocessing"])
    model = build_classifier(params.model.backbone, len(classes), head_config(params.model))
    if params.strategy != "scratch":
        if pretrained["state_dict"] is None:
            raise UserError(f"params.yaml: strategy {params.strategy} needs pretrained weights, but model.weights is none; "
                            "use strategy scratch or set model.weights")
        model.backbone.load_state_dict(pretrained["state_dict"])
    criterion = nn.CrossEntropyLoss(label_smoothing=params.train.label_smoothing)
    log.info("strategy %s, backbone %s, %d classes, device %s", params.strategy, params.model.backbone, len(classes), device)

    with Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False) as live:
        trainer = Trainer(model, params, classes, prep, live)
        try:
            if params.strategy in ("frozen", "gradual"):
                features = torch.load(FEATURES, map_location="cpu", weights_only=True)
                trainer.run(fit_head_on_features(model.head, features, params, criterion, first_epoch=1))
                trainer.restore_best()
            if params.strategy in ("gradual", "finetune", "scratch"):
                model.to(device)
                if params.train.channels_last:
                    model.to(memory_format=torch.channels_last)
                lr, mult = params.train.lr, params.train.backbone_lr_mult
                # gradual: the head is already trained, so everything moves gently.
                rates = {"gradual": (lr * mult, lr * mult), "finetune": (lr * mult, lr), "scratch": (lr, lr)}
                trainer.run(fit_network(model, params, prep, device, criterion, len(trainer.history) + 1,
                                        *rates[params.strategy]))
        except KeyboardInterrupt:
            log.error("interrupted: %s keeps the best epoch so far (%s)", MODEL,
                      trainer.best.epoch if trainer.best else "none yet")
            sys.exit(130)
        best = trainer.best
        live.summary["best"] = asdict(best)
    save_learning_curves(trainer.history, best.epoch, CURVES_PNG)
    log.info("best epoch %d (%s): val acc %.4f, val loss %.4f", best.epoch, best.phase, best.val_acc, best.val_loss)


if __name__ == "__main__":
    run_stage(main)
