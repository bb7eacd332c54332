"""The training loop: what a strategy means, epochs of the head on cached features, and epochs
of the whole network on images.

`plan_for` is the one place that reads `strategy`; everything after it follows the plan.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.lib.backbones import read_pretrained_and_sha256
from stages.lib.calibration import calibrate, fit_temperature, negative_log_likelihood
from stages.lib.checkpoint import Checkpoint, save_checkpoint
from stages.lib.classifier import Classifier, build_classifier, head_config, make_head, prefixed, unprefixed
from stages.lib.cli import UserError
from stages.lib.data import EpochSampler, ImageDataset, decode_size, eval_transform, make_loader, train_transform
from stages.lib.features import read_head_features, split_probabilities
from stages.lib.head import feature_probabilities, head_layers
from stages.lib.head_search import Trial, search_head, winner
from stages.lib.index_table import read_classes, read_split
from stages.lib.inference import batch_probabilities, loader_probabilities
from stages.lib.metrics import val_scores
from stages.lib.optim import LinearToZero, build_optimizer, build_scheduler
from stages.lib.params import Params
from stages.lib.paths import INDEX_CSV, MODEL, PRETRAINED, features_file
from stages.lib.preprocessing import Preprocessing
from stages.lib.records import Epoch, EpochResult, Records, read_resume_state, run_fingerprint
from stages.lib.runtime import autocast, grad_scaler, sum_over_processes, to_device

log = logging.getLogger("train")


@dataclass(frozen=True)
class Plan:
    """What a strategy trains. The head phase always learns at train.lr."""
    head_first: bool  # a new head on the cached features of the pretrained backbone
    network: bool  # then every layer on images
    pretrained: bool  # the network starts from the pretrained backbone (else random weights)
    backbone_lr: float  # the network phase's learning rates
    head_lr: float
    # auto: a network epoch counts only if it gets more val images right than the head, and the
    # network phase stops at the first epoch that does not improve on the phase's own best
    gated: bool = False


def plan_for(params: Params, has_pretrained: bool) -> Plan:
    lr, mult = params.train.lr, params.train.backbone_lr_mult
    if params.strategy != "scratch" and not has_pretrained:
        raise UserError(f"params.yaml: strategy {params.strategy} needs pretrained weights, but model.weights is none; "
                        "use strategy scratch or set model.weights")
    if params.strategy == "frozen":
        return Plan(head_first=True, network=False, pretrained=True, backbone_lr=0.0, head_lr=lr)
    if params.strategy == "scratch":
        return Plan(head_first=False, network=True, pretrained=False, backbone_lr=lr, head_lr=lr)
    head_first = params.train.head_epochs > 0
    # A head trained on the features first should move as gently as the backbone under it.
    return Plan(head_first=head_first, network=True, pretrained=True, backbone_lr=lr * mult,
                head_lr=lr * mult if head_first else lr, gated=params.strategy == "auto")


@dataclass
class Run:
    """What every epoch of one training run shares."""
    params: Params
    device: torch.device
    classes: int
    class_weights: torch.Tensor | None = None  # train.class_weighting balanced: the loss's weight per class
    timing: Counter = field(default_factory=Counter)  # seconds: head, data, compute, validate
    # when the train stage began (train.time_budget); read through the module, as every clock read here
    started: float = field(default_factory=lambda: time.perf_counter())
    rank: int = 0
    world_size: int = 1
    network_steps: int = 0  # optimizer steps of the whole network taken (metrics/train/metrics.json)
    label_smoothing: float = 0.0

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return nn.functional.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class HeadSettings:
    """What fitting a head on cached features uses (fit_head): the train stage's head phase's
    (head_settings) or the suspects stage's own params. build_optimizer and build_scheduler read
    the fields of their names."""
    lr: float
    weight_decay: float
    epochs: int
    max_steps: int  # fewer epochs on a large dataset (head_epochs_for)
    batch_size: int
    label_smoothing: float
    seed: int
    tta: str  # how the val features are scored
    optimizer: str = "adamw"
    momentum: float = 0.9
    scheduler: str = "onecycle"
    step_size: int = 7
    gamma: float = 0.1
    class_weighting: str = "none"


def head_settings(params: Params) -> HeadSettings:
    """The train stage's head: train.lr, train.head_epochs, ... and model.tta."""
    t = params.train
    return HeadSettings(t.lr, t.weight_decay, t.head_epochs, t.head_max_steps, t.head_batch_size, t.label_smoothing,
                        t.seed, params.model.tta, t.optimizer, t.momentum, t.scheduler, t.step_size, t.gamma,
                        t.class_weighting)


def class_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=classes).double()


def balanced_class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """n / (classes * n_c) per class, as scikit-learn's class_weight="balanced": a class with
    half the average count weighs twice as much."""
    counts = class_counts(labels, classes)
    return (len(labels) / (classes * counts.clamp_min(1))).float()


def balanced_sample_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Per item, 1 / its class's count: drawing by these, every class comes up equally often."""
    return (1 / class_counts(labels, classes).clamp_min(1))[labels]


def make_run(params: Params, device: torch.device, train_labels: torch.Tensor, classes: int, rank: int = 0,
             world_size: int = 1) -> Run:
    weights = balanced_class_weights(train_labels, classes) if params.train.class_weighting == "balanced" else None
    return Run(params, device, classes, weights, rank=rank, world_size=world_size,
               label_smoothing=params.train.label_smoothing)


@dataclass
class ModelParts:
    """The parts of the classifier being trained. Until a network phase attaches the whole network
    (a `Classifier`) only the head exists and the backbone is the pretrained state dict: a frozen
    run never builds the backbone (nor imports timm or torchvision)."""
    pretrained: dict | None
    head: nn.Module | None = None
    backbone: nn.Module | None = None

    def state_dict(self) -> dict:
        """The classifier's state dict, keys as in `Classifier`."""
        backbone = self.backbone.state_dict() if self.backbone is not None else self.pretrained
        return {**prefixed("backbone", backbone), **prefixed("head", self.head.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(unprefixed("head", state))
        if self.backbone is not None:
            self.backbone.load_state_dict(unprefixed("backbone", state))


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def train_one_epoch(model: nn.Module, batches, opt: Optimization, run: Run, epoch: int,
                    on_images: bool) -> tuple[float, float]:
    """One pass over `batches`; returns mean loss and accuracy. Stops on a non-finite loss.

    On images: on the run's device, with its precision and memory format, a progress bar, and the
    seconds spent waiting for batches ("data") and the rest ("compute") added to run.timing: if
    data is more than a sliver, the loader does not keep up. On cached features: on the CPU,
    quietly (an epoch takes milliseconds).
    """
    settings = run.params.train
    device = run.device if on_images else torch.device("cpu")
    amp, channels_last = (settings.amp, settings.channels_last) if on_images else (False, False)
    timing = run.timing if on_images else Counter()
    total_loss = correct = seen = 0
    # disable=None: a bar on a terminal, none in CI logs.
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if on_images else True)
    waited_from = time.perf_counter()
    for inputs, labels in bar:
        computing_from = time.perf_counter()
        timing["data"] += computing_from - waited_from
        inputs, labels = to_device(inputs, device, channels_last), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(inputs)
            loss = run.loss(logits, labels)
        if not torch.isfinite(loss):
            raise UserError(f"epoch {epoch}: the loss became {loss.item()}; lower train.lr "
                            f"(the learning rate was {opt.lr():.3g})")
        opt.step(loss)
        run.network_steps += on_images
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        waited_from = time.perf_counter()
        timing["compute"] += waited_from - computing_from
    total_loss, correct, seen = sum_over_processes(total_loss, correct, seen)
    return total_loss / seen, correct / seen


READ_BATCHES = 8  # batches of cached features read from disk at once: reading batch by batch cost a sixth of
#                  the head's training (50,000 images: 85 s against 71 s), and 8 batches are ~1 MB whatever the
#                  split's size


def shuffled_batches(features, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                     sample_weights: torch.Tensor | None = None):
    """One epoch of shuffled batches of cached features ([images, views, width], an array or
    OnDisk; item i is image i // views in view i % views), read READ_BATCHES batches at a time as
    they are due: a DataLoader would index and collate every sample one by one, which costs more
    than the head's training itself. With `sample_weights`, as many items drawn with replacement
    by those weights (class-balanced)."""
    if sample_weights is None:
        order = torch.randperm(len(labels), generator=generator)
    else:
        order = torch.multinomial(sample_weights, len(labels), replacement=True, generator=generator)
    views = features.shape[1]
    for items in order.split(batch_size * READ_BATCHES):
        chosen = items.numpy()
        rows = torch.from_numpy(features[chosen // views, chosen % views])
        for start in range(0, len(items), batch_size):
            yield rows[start:start + batch_size], labels[items[start:start + batch_size]]


def head_epochs_for(settings: HeadSettings, vectors: int) -> int:
    """The head's epochs (train.head_epochs), or as many whole epochs of `vectors` as fit in its
    max_steps (train.head_max_steps) when that is fewer (at least one). A head's epoch costs its
    steps, so with epochs alone every new image would lengthen each head the pipeline trains (train,
    the suspects' folds, the head search); on a large dataset a few epochs are as many samples as
    many epochs of a small one."""
    steps_per_epoch = math.ceil(vectors / settings.batch_size)
    return min(settings.epochs, max(1, settings.max_steps // steps_per_epoch))


@contextmanager
def one_torch_thread():
    """Torch on one thread, then as many as before. A head's step works on a few thousand numbers:
    waking a second thread for its dropout mask and matrix products costs more than it saves
    (bench.head_threads: the suspects stage's five heads 2.3x to 2.6x faster on the archives). And
    on more than one thread the matrix products of some shapes round differently with the number
    of threads, so a head was not the same bits on two cores as in a queue worker on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_head(head: nn.Module, train: dict, val: dict, run: Run, first_epoch: int, settings: HeadSettings):
    """Train the head on cached features, on one torch thread; yields an Epoch per epoch: head
    epochs take milliseconds, so an interrupted head phase starts over rather than resuming."""
    run = replace(run, label_smoothing=settings.label_smoothing)
    views = train["features"].shape[1]
    labels = torch.from_numpy(train["labels"]).repeat_interleave(views)
    generator = torch.Generator().manual_seed(settings.seed)
    sample_weights = balanced_sample_weights(labels, run.classes) if settings.class_weighting == "sampler" else None
    optimizer = build_optimizer([{"params": head.parameters(), "lr": settings.lr}], settings)
    steps = math.ceil(len(labels) / settings.batch_size)
    epochs = head_epochs_for(settings, len(labels))
    opt = Optimization(optimizer, build_scheduler(optimizer, settings, steps, epochs))
    for i in range(epochs):
        epoch = first_epoch + i
        started = time.perf_counter()
        head.train()
        lr = opt.lr()
        batches = shuffled_batches(train["features"], labels, settings.batch_size, generator, sample_weights)
        with one_torch_thread():
            train_loss, train_acc = train_one_epoch(head, batches, opt, run, epoch, on_images=False)
        probs = feature_probabilities(head_layers(head.state_dict()), val, settings.tta)
        run.timing["head"] += time.perf_counter() - started
        yield Epoch(EpochResult(epoch, "head", train_loss, train_acc, *val_scores(probs, val["labels"]), lr))


def keep_batchnorm_statistics(module: nn.Module, frozen_only: bool = False) -> None:
    """Put every BatchNorm in eval mode (or only those whose weights do not train): with a few
    hundred images and small batches, batch statistics are noisy, and the pretrained running
    statistics are what the head was fit to."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if not frozen_only or not any(w.requires_grad for w in layer.parameters()):
                layer.eval()


def freeze_early_weights(backbone: nn.Module, trainable_fraction: float) -> tuple[int, int]:
    """Only the last `trainable_fraction` of the backbone's weights (by count, in layer order)
    train. The input needs no gradient, so autograd's graph starts at the first trainable layer:
    the frozen ones before it run forward only, which is most of the saving, since a CNN's early
    layers hold few weights but work at the highest resolution. Returns (trainable, all) tensors."""
    weights = list(backbone.parameters())
    total = sum(w.numel() for w in weights)
    frozen_until = (1 - trainable_fraction) * total
    seen = 0
    for weight in weights:
        seen += weight.numel()
        weight.requires_grad_(seen > frozen_until or trainable_fraction >= 1)
    return sum(w.requires_grad for w in weights), len(weights)


def network_loaders(run: Run, prep: Preprocessing) -> tuple[EpochSampler, object, object]:
    """The train split's sampler and loader (augmented, shuffled per epoch, crops of
    train.image_size), and the val loader (train.eval_size, as the checkpoint then records)."""
    settings, pin = run.params.train, run.device.type == "cuda"
    crops = replace(prep, input_size=settings.image_size or prep.input_size)
    train_set = ImageDataset(read_split("train"), train_transform(crops, run.params.augment), decode_size(prep, True),
                             settings.seed)
    scored = prep.at_size(settings.eval_size)
    val_set = ImageDataset(read_split("val"), eval_transform(scored), decode_size(scored))
    # Under torchrun each process takes its share of every epoch; train.batch_size is per process.
    weights = None
    if settings.class_weighting == "sampler":
        weights = balanced_sample_weights(torch.tensor(train_set.labels), run.classes)
    sampler = EpochSampler(len(train_set), shuffle=True, seed=settings.seed, rank=run.rank, world_size=run.world_size,
                           weights=weights)
    return (sampler, make_loader(train_set, settings.batch_size, sampler, settings.workers, pin, settings.seed),
            make_loader(val_set, settings.batch_size, None, settings.workers, pin, settings.seed))


def backbone_groups(backbone: nn.Module, lr: float, layer_decay: float, buckets: int = 8) -> list[dict]:
    """The backbone's trainable weights as parameter groups whose rate grows geometrically with
    depth (the weight tensors in layer order, cut in eighths): the last eighth at `lr` (listed
    first: the records log the first group's rate), the first at `lr * layer_decay`. Early layers
    hold the generic features that transfer, so they should move least (layer-wise learning-rate
    decay, as BEiT and timm's fine-tuning use); eight steps rather than a group per tensor keep the
    optimizer's foreach kernels few."""
    weights = list(backbone.parameters())
    grouped: list[list[nn.Parameter]] = [[] for _ in range(buckets)]
    for position, weight in enumerate(weights):
        if weight.requires_grad:
            grouped[position * buckets // len(weights)].append(weight)
    return [{"params": group, "lr": lr * layer_decay ** ((buckets - 1 - k) / (buckets - 1))}
            for k, group in reversed(list(enumerate(grouped))) if group]


def network_optimization(model: Classifier, run: Run, plan: Plan, steps_per_epoch: int,
                         resume: dict | None) -> Optimization:
    """The backbone's parameter groups (one, or eighths by depth under train.layer_decay) and the
    head's, at the plan's learning rates; as they were when resuming."""
    settings = run.params.train
    groups = backbone_groups(model.backbone, plan.backbone_lr, settings.layer_decay)
    groups.append({"params": list(model.head.parameters()), "lr": plan.head_lr})
    optimizer = build_optimizer(groups, settings)
    if settings.time_budget is None:
        scheduler = build_scheduler(optimizer, settings, steps_per_epoch, settings.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearToZero(steps_per_epoch * settings.epochs))
    opt = Optimization(optimizer, scheduler, grad_scaler(run.device, settings.amp))
    if resume is not None:
        opt.optimizer.load_state_dict(resume["optimizer"])
        opt.scheduler.load_state_dict(resume["scheduler"])
        opt.scaler.load_state_dict(resume["scaler"])
    return opt


def fit_network(model: Classifier, run: Run, prep: Preprocessing, plan: Plan, first_epoch: int,
                resume: dict | None = None):
    """Train every layer on images; yields an Epoch per epoch, with the state to resume from and
    which val images it got right.

    `resume` is such a state: the optimizer, scheduler and scaler continue where they were, and
    the epochs already done are skipped (each epoch's order and augmentations depend only on the
    seed and its number, so the rest runs as it would have)."""
    settings, device = run.params.train, run.device
    sampler, train_loader, val_loader = network_loaders(run, prep)
    opt = network_optimization(model, run, plan, len(train_loader), resume)
    runner = model
    if run.world_size > 1:
        # Gradients are averaged across processes after each backward pass.
        device_ids = [device.index] if device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if settings.compile:
        runner = torch.compile(runner)
    first = resume["epochs_done"] if resume is not None else 0
    run.network_steps = first * len(train_loader)  # a resumed run counts the steps before it too
    budget = None
    if settings.time_budget is not None:
        budget = Budget(run, opt.scheduler.lr_lambdas[0], len(train_loader), validation_seconds(model, val_loader, run))
    i = first
    while (i < settings.epochs) if budget is None else budget.another_epoch(validated=i > first):
        sampler.set_epoch(i)
        runner.train()
        keep_batchnorm_statistics(model.backbone, frozen_only=not settings.freeze_bn)
        lr = opt.lr()
        batches = train_loader if budget is None else budget.batches(train_loader)
        train_loss, train_acc = train_one_epoch(runner, batches, opt, run, first_epoch + i, on_images=True)
        started = time.perf_counter()
        # Every process scores the whole val split with the same weights, so all agree on the best
        # epoch; DDP's wrapper is for training only.
        probs, labels = loader_probabilities(model, val_loader, device, run.params.model.tta, settings.channels_last,
                                             desc="validating")
        run.timing["validate"] += time.perf_counter() - started
        state = {"epochs_done": i + 1, "optimizer": opt.optimizer.state_dict(),
                 "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict()}
        result = EpochResult(first_epoch + i, "network", train_loss, train_acc, *val_scores(probs, labels), lr)
        i += 1
        yield Epoch(result, state, (probs.argmax(1) == labels).tolist())


# --- train.time_budget: the network phase planned on the clock ---------------------------------
PACE_STEPS = 5  # steps timed, after the first (which pays for start-up), before the plan is made
TAIL_SECONDS = 2.0  # after the last validation: the checkpoint written, the stage's records


def validation_seconds(model: nn.Module, val_loader, run: Run) -> float:
    """What one validation pass will take: its second and third batches, timed, per batch, times
    the batches. The first batch is not timed: it pays for starting the loader's workers (seconds,
    each importing torch), which made the plan leave a third of the budget unused (bench.budget)."""
    batches = iter(val_loader)
    tta, channels_last = run.params.model.tta, run.params.train.channels_last
    with torch.inference_mode():
        first = next(batches)[0]
        started = time.perf_counter()
        batch_probabilities(model.eval(), first, run.device, tta, channels_last)
        per_batch, started, timed = time.perf_counter() - started, time.perf_counter(), 0  # one batch: its own
        for images, _ in itertools.islice(batches, 2):
            batch_probabilities(model, images, run.device, tta, channels_last)
            timed += 1
    if timed:
        per_batch = (time.perf_counter() - started) / timed
    return per_batch * len(val_loader)


def steps_that_fit(seconds_left: float, pace: float, validation: float, done: int, steps_per_epoch: int) -> int:
    """The most steps, counted from the phase's start, whose training (`pace` seconds each, from
    `done` on) and validations (one at each epoch end reached, one at the last step; then one
    more, for the temperature) end within `seconds_left`; `done` when not even one more step and
    its validation do. Found by bisection: the time grows with the steps, and a week's budget at a
    GPU's pace is millions of them."""
    def fits(total: int) -> bool:
        validations = total // steps_per_epoch - done // steps_per_epoch + (total % steps_per_epoch > 0) + 1
        return (total - done) * pace + validations * validation + TAIL_SECONDS <= seconds_left

    low, high = done, done + max(0, int(seconds_left / pace))
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass
class Budget:
    """Watches the network phase's steps (run.network_steps); after the first few it plans how many
    fit in what is left of train.time_budget (at the pace measured, with every validation they
    bring), and lets the learning rate fall to zero at the last of them (until then, the schedule's
    end is train.epochs' steps); from the warm-up's end on it plans again at each epoch's start.
    Every process of a distributed run plans from the same (averaged) figures, so all stop at the
    same step. A resumed run keeps the plan it made (the scheduler's state holds it)."""
    run: Run
    schedule: LinearToZero
    steps_per_epoch: int
    validation: float  # seconds per validation pass, estimated
    taken: int = 0  # steps by this process (run.network_steps counts those of a resumed run's before too)
    timed_from: float = 0.0
    last_step: float | None = None  # when this process's last step ended
    began: float = 0.0  # when this process's first step began
    epoch_ends: list[float] = field(default_factory=list)  # seconds from an epoch's last step to the next's first batch
    planned_at_ends: int = -1  # len(epoch_ends) when last planned; -1: not re-planned since the warm-up

    def spent(self) -> bool:
        return self.run.network_steps >= self.schedule.total

    def another_epoch(self, validated: bool) -> bool:
        """Whether the network phase goes on: not once the planned steps are taken, nor, before
        the plan, after a validated epoch when what is left of the budget cannot hold the rest of
        the timed steps and what the plan would add to them (at the pace so far, its epoch ends
        included)."""
        if self.spent():
            return False
        if validated and not self.schedule.planned:
            # as the plan counts: the steps still to time and one more, its validations and the tail
            pace = (time.perf_counter() - self.began) / self.taken
            left, needed = (v / self.run.world_size for v in sum_over_processes(
                self.seconds_left(), (max(0, 1 + PACE_STEPS - self.taken) + 1) * pace + 2 * self.validation
                + TAIL_SECONDS))
            if left < needed:
                self.too_small(left, needed, "stopping after the epoch just validated")
                return False
        return True

    def too_small(self, left: float, needed: float, stop: str) -> None:
        log.warning("train.time_budget: %g s cannot hold the network's first %d timed steps and a validation (%.1f s "
                    "left, %.1f s needed): %s", self.budget, 1 + PACE_STEPS, max(0.0, left), needed, stop)

    @property
    def budget(self) -> float:
        return self.run.params.train.time_budget

    def seconds_left(self) -> float:
        return self.budget - (time.perf_counter() - self.run.started)

    def batches(self, loader):
        """The loader's batches until the planned steps are taken."""
        for index, batch in enumerate(loader):
            if index == 0 and self.last_step is not None:
                self.epoch_ends.append(time.perf_counter() - self.last_step)
            if self.taken == 0:
                self.began = time.perf_counter()
            if self.spent():
                return
            yield batch
            self.stepped()

    def stepped(self) -> None:
        self.taken += 1
        if self.taken == 1:
            self.timed_from = time.perf_counter()  # the first step pays for start-up: the pace is timed after it
        elif self.taken == 1 + PACE_STEPS and not self.schedule.planned:
            self.plan()
        elif (self.taken > 1 + PACE_STEPS and self.schedule.planned and not self.spent()
              and self.run.network_steps >= self.schedule.warm and len(self.epoch_ends) > self.planned_at_ends):
            # A few steps' pace can be a third off (the loader's workers filling up, a neighbour's
            # load): from the warm-up's end on, each epoch's start plans again on every step timed.
            # Not once the plan is spent: the rate is at zero there, and would stay at zero.
            self.plan()
        self.last_step = time.perf_counter()

    def plan(self) -> None:
        # On a split of a few batches, epochs end while the pace is timed: what they took (validation,
        # records, checkpoint) is the cost of an epoch end, and is not part of the pace.
        now = time.perf_counter()
        ends = sum(self.epoch_ends)
        validation = ends / len(self.epoch_ends) if self.epoch_ends else self.validation
        world = self.run.world_size
        pace, left, validation = (v / world for v in sum_over_processes(
            (now - self.timed_from - ends) / (self.taken - 1), self.budget - (now - self.run.started), validation))
        done = self.run.network_steps
        planned = steps_that_fit(left, pace, validation, done, self.steps_per_epoch)
        if planned == done and not self.schedule.planned:
            self.too_small(left, pace + 2 * validation + TAIL_SECONDS, "stopping at this epoch's validation")
        if self.schedule.planned:
            self.schedule.replan(planned, done)
            self.planned_at_ends = len(self.epoch_ends)
        else:
            self.schedule.plan(planned)
        if planned > done:
            log.info("train.time_budget: %.0f s left at %.2f s a step and %.1f s an epoch end: %d more steps, the "
                     "learning rate falling to zero at the last", left, pace, validation, planned - done)


# --- the phases, with their records ----------------------------------------------------------
# DVC deletes a stage's outputs before running it, except persistent ones: models/train_state.pt
# is one (dvc.yaml), so a run killed by SIGKILL or a power cut finds it when `dvc repro` runs
# again, and continues after its last completed epoch if params and inputs are the same.

def early_stopped(epochs, patience: int, select_on: str, best: EpochResult | None = None, announce: bool = False):
    """The epochs, up to `patience` epochs in a row that do not beat `best` and the epochs before
    them (0: all of them)."""
    stale = 0
    for epoch in epochs:
        yield epoch
        best, stale = (epoch.result, 0) if epoch.result.beats(best, select_on) else (best, stale + 1)
        if patience and stale >= patience:
            if announce:
                log.info("no better val score for %d epochs: stopping this phase early", stale)
            return


def pays_on_val(head_right: list[bool], right: list[bool]) -> bool:
    """Whether a network epoch gets more val images right than the head (a tie keeps the head).
    bench.gate measured stricter gates (McNemar's exact test at p < 0.05 and 0.25) over three
    archives and three seeds: they never picked a model better on test than this rule's, and once
    kept a head that was worse than its network epoch."""
    return sum(right) > sum(head_right)


def record_phase(epochs, records: Records, model: ModelParts, patience: int, gate=None) -> None:
    """Record a phase's epochs, stopping early after `patience` epochs without a better val score
    (0: never). With `gate`, an epoch can become the best only if gate(its val_right) holds, and
    progress is measured against the phase's own epochs (the first, still warming up, may trail
    the head)."""
    for epoch in early_stopped(epochs, patience, records.params.train.select_on, None if gate else records.best,
                               announce=True):
        records.record(epoch.result, model, eligible=gate is None or gate(epoch.val_right))
        if epoch.resume_state is not None:
            records.save_resume_state(model, network=epoch.resume_state)


def head_phase(model: ModelParts, records: Records, run: Run, pretrained_sha256: str,
               resumed: dict | None) -> list[Trial]:
    """A new head on the cached features; or, resuming, the head the interrupted run left.
    Returns the head settings tried (lib/head_search.py): the grid with train.head_search, else
    the one setting of params.yaml."""
    params, settings = run.params, head_settings(run.params)
    train_features, val_features = read_head_features(pretrained_sha256)
    images, views, width = train_features["features"].shape
    epochs = head_epochs_for(settings, images * views)
    if epochs < settings.epochs:
        log.info("the head trains %d epochs, not train.head_epochs %d: %d feature vectors, train.head_max_steps %d",
                 epochs, settings.epochs, images * views, settings.max_steps)

    def new_head() -> nn.Module:
        return make_head(width, len(records.classes), **head_config(params.model))

    def fit(head: nn.Module, trial: HeadSettings, timing: Counter):
        return early_stopped(fit_head(head, train_features, val_features, replace(run, timing=timing), 1, trial),
                             params.train.patience, params.train.select_on)

    trials = []
    if params.train.head_search:
        trials = search_head(new_head, fit, settings, params.train.select_on, run.timing)
    if trials:
        chosen = winner(trials, params.train.select_on)
        log.info("head search: lr %.3g, weight decay %.3g of %d settings (val %s %.4f, loss %.4f)", chosen.lr,
                 chosen.weight_decay, len(trials), params.train.select_on, chosen.best.score(params.train.select_on),
                 chosen.best.val_loss)
        settings = replace(settings, lr=chosen.lr, weight_decay=chosen.weight_decay)
    model.head = new_head()
    if resumed is not None:
        records.resume(resumed)
        model.load_state_dict(resumed["model"])
    else:
        record_phase(fit_head(model.head, train_features, val_features, run, 1, settings), records, model,
                     params.train.patience)
        records.restore_best(model)
        probs = feature_probabilities(head_layers(model.head.state_dict()), val_features, params.model.tta)
        records.head_val_right = (probs.argmax(1) == val_features["labels"]).tolist()
        records.save_resume_state(model)
    head_epochs = [Trial(params.train.lr, params.train.weight_decay, r) for r in records.history if r.phase == "head"]
    if trials or not head_epochs:
        return trials
    return [winner(head_epochs, params.train.select_on)]  # the one setting, with its best head epoch


def network_phase(model: ModelParts, records: Records, run: Run, prep: Preprocessing, plan: Plan,
                  resumed: dict | None) -> None:
    """Every layer on the images, from the warm head, the pretrained backbone or random weights.
    Skipped when the head phase already spent train.time_budget: the head's model is the run's."""
    params = run.params
    budget = params.train.time_budget
    if plan.head_first and budget is not None:
        spent = sum_over_processes(time.perf_counter() - run.started)[0] / run.world_size  # all processes agree
        if spent >= budget:
            log.warning("train.time_budget: %g s spent by the head phase (%.0f s): the network phase is skipped, "
                        "the head's model is the run's", budget, spent)
            return
    # Called here, not at the start: it takes 2 s, and the head phase needs none of it.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if resumed is not None and resumed["network"] is None:
        torch.set_rng_state(resumed["rng"])  # as it was when the head phase ended
    network = build_classifier(params.model.backbone, len(records.classes), head_config(params.model))
    if plan.pretrained:
        network.backbone.load_state_dict(model.pretrained)
    if plan.head_first:
        network.head = model.head
    if resumed is not None:
        if not plan.head_first:
            records.resume(resumed)
        network.load_state_dict(resumed["model"])
    model.head, model.backbone = network.head, network.backbone
    if plan.pretrained and params.train.trainable_fraction < 1:
        trainable, weights = freeze_early_weights(network.backbone, params.train.trainable_fraction)
        log.info("the last %d of the backbone's %d weight tensors train (train.trainable_fraction %g)", trainable,
                 weights, params.train.trainable_fraction)
    network.to(run.device)
    if params.train.channels_last:
        network.to(memory_format=torch.channels_last)
    first_epoch = sum(record.phase == "head" for record in records.history) + 1
    if resumed is not None and resumed["network"] is not None:
        torch.set_rng_state(resumed["rng"])  # as it was after the last completed epoch
    epochs = fit_network(network, run, prep, plan, first_epoch, resumed["network"] if resumed is not None else None)
    if plan.gated:
        # Fine-tune only while the network's val score improves, and adopt an epoch only if it
        # gets more val images right than the head.
        record_phase(epochs, records, model, 1, gate=lambda right: pays_on_val(records.head_val_right, right))
    else:
        record_phase(epochs, records, model, params.train.patience)


def train_model(plan: Plan, model: ModelParts, records: Records, run: Run, prep: Preprocessing, pretrained_sha256: str,
                resumed: dict | None) -> list[Trial]:
    """The phases the plan asks for; models/model.safetensors holds the best epoch after each improvement.
    Returns the head settings tried (none without a head phase)."""
    trials = head_phase(model, records, run, pretrained_sha256, resumed) if plan.head_first else []
    if plan.network:
        network_phase(model, records, run, prep, plan, resumed)
    return trials


# --- the whole of it ---------------------------------------------------------------------------

@dataclass
class Trained:
    records: Records  # every epoch, and the best one
    run: Run  # its timing included
    trials: list[Trial]  # the head settings tried
    checkpoint: Checkpoint  # the best epoch, its temperature fitted: what models/model.safetensors holds
    temperature_fitted: bool  # False: too few val images, the temperature stayed 1
    over_budget: float | None  # seconds past train.time_budget when the model was written (None: no budget)


# Fitted on 30 val images, a temperature lowered the NLL of the other val images in 78% to 95% of
# random draws on the three archives, against 24% to 42% on 5 images and 53% to 68% on 10
# (python -m bench.temperature, docs/stages.md): below this, it stays 1.
MIN_VAL_IMAGES_FOR_TEMPERATURE = 30


def with_fitted_temperature(checkpoint: Checkpoint, params: Params) -> tuple[Checkpoint, bool]:
    """The checkpoint with the temperature that makes its val probabilities best calibrated (the
    lowest NLL), and True; with too few val images, the checkpoint at temperature 1, and False.
    The predicted classes do not change."""
    probs, labels = split_probabilities(checkpoint, "val", read_split("val"), params.train.batch_size,
                                        params.train.workers)
    if len(labels) < MIN_VAL_IMAGES_FOR_TEMPERATURE:
        log.warning("temperature kept at 1: the val split has %d images, fewer than the %d a fitted temperature "
                    "needs (docs/stages.md, Calibration)", len(labels), MIN_VAL_IMAGES_FOR_TEMPERATURE)
        return replace(checkpoint, temperature=1.0), False
    temperature = fit_temperature(np.log(np.maximum(probs, 1e-12)), labels)
    before = negative_log_likelihood(probs, labels)
    after = negative_log_likelihood(calibrate(probs, temperature), labels)
    log.info("temperature %.4g fitted on the val split: NLL %.4f -> %.4f", temperature, before, after)
    return replace(checkpoint, temperature=temperature), True


def train_and_calibrate(params: Params, device: torch.device, live=None, rank: int = 0,
                        world_size: int = 1) -> Trained:
    """What the train stage does to the model: the strategy's phases on the train split, the best
    epoch on val, its temperature fitted on val, written to models/model.safetensors (by the first process).
    A run interrupted before resumes from models/train_state.pt if its params and inputs are the
    same; Ctrl-C or SIGTERM leave the best epoch so far in models/model.safetensors. `live`: DVCLive, to
    log every epoch."""
    torch.manual_seed(params.train.seed)
    classes = read_classes()
    pretrained, pretrained_sha256 = read_pretrained_and_sha256(PRETRAINED)
    plan = plan_for(params, has_pretrained=pretrained["state_dict"] is not None)
    prep = Preprocessing.from_dict(pretrained["preprocessing"])
    run = make_run(params, device, torch.tensor(read_split("train")["label"].tolist()), len(classes), rank,
                   world_size)
    log.info("strategy %s, backbone %s, %d classes, device %s", params.strategy, params.model.backbone, len(classes),
             device)
    fingerprint = run_fingerprint(params, [PRETRAINED, INDEX_CSV, features_file("train"), features_file("val")],
                                  {PRETRAINED: pretrained_sha256})
    records = Records(params, classes, prep, pretrained_sha256, run.timing, live, fingerprint, writes=rank == 0)
    model = ModelParts(pretrained["state_dict"])
    try:
        trials = train_model(plan, model, records, run, prep, pretrained_sha256, read_resume_state(fingerprint))
    except KeyboardInterrupt:
        records.save_best()
        log.error("interrupted: %s keeps the best epoch so far (%s)", MODEL,
                  records.best.epoch if records.best else "none yet")
        raise
    records.save_best()
    records.save_resume_state(model, complete=True)
    best = records.best
    log.info("best epoch %d (%s): val acc %.4f, val loss %.4f", best.epoch, best.phase, best.val_acc, best.val_loss)
    checkpoint, fitted = with_fitted_temperature(records.best_checkpoint, params)
    if records.writes:
        save_checkpoint(MODEL, checkpoint)
    budget = params.train.time_budget
    over = None if budget is None else round(max(0.0, time.perf_counter() - run.started - budget), 1)
    if over:
        log.warning("train.time_budget: the stage ran %.1f s over its %g s", over, budget)
    return Trained(records, run, trials, checkpoint, fitted, over)
