"""The baseline for speed comparisons: PyTorch's transfer-learning tutorial loop, as written.

    python -m bench.recipe --strategy frozen|finetune [--epochs 25] [--backbone efficientnet_lite0]

ImageFolder over the archive's train and val folders, batches of 4, SGD (lr 0.001, momentum 0.9),
StepLR (7 epochs, 0.1), 25 epochs, every full-size JPEG decoded again each epoch, the best epoch
picked on the val folder (which our pipeline keeps as its test split). Only the backbone differs
from the tutorial's ResNet18: the same network our pipeline uses, built by stages.lib.classifier, with
its own preprocessing. Prints the wall time and the best val accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from stages.lib.backbones import preprocessing_for, pretrained_backbone_state
from stages.lib.classifier import build_classifier

ARCHIVE_ROOT = Path("data/raw/hymenoptera_data")


def recipe_loaders(backbone: str, batch_size: int, workers: int) -> dict:
    prep = preprocessing_for(backbone, "pretrained")
    interpolation = InterpolationMode(prep.interpolation)
    tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(prep.mean, prep.std)]
    transforms = {
        "train": T.Compose([T.RandomResizedCrop(prep.input_size, interpolation=interpolation),
                            T.RandomHorizontalFlip(), *tail]),
        "val": T.Compose([T.Resize(prep.resize_size, interpolation=interpolation), T.CenterCrop(prep.input_size),
                          *tail]),
    }
    return {
        split: torch.utils.data.DataLoader(
            datasets.ImageFolder(ARCHIVE_ROOT / split, transforms[split]),
            batch_size=batch_size, shuffle=True, num_workers=workers,
        )
        for split in ("train", "val")
    }


def train_model(model, loaders, criterion, optimizer, scheduler, epochs: int, waited: list[float]) -> float:
    """The tutorial's train_model: a train and a val phase per epoch, keep the best val epoch.
    Only addition: the seconds spent waiting for the data loader are added to `waited[0]`."""
    best_weights, best_acc = copy.deepcopy(model.state_dict()), 0.0
    for epoch in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects, seen = 0.0, 0, 0
            batches = iter(loaders[phase])
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                waited[0] += time.perf_counter() - started
                if batch is None:
                    break
                inputs, labels = batch
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += (outputs.argmax(1) == labels).sum().item()
                seen += inputs.size(0)
            if phase == "train":
                scheduler.step()
            acc = running_corrects / seen
            print(f"epoch {epoch + 1}/{epochs} {phase}: loss {running_loss / seen:.4f} acc {acc:.4f}", flush=True)
            if phase == "val" and acc > best_acc:
                best_acc, best_weights = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)
    return best_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["frozen", "finetune"], required=True)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=4, help="the tutorial's 4")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if not ARCHIVE_ROOT.is_dir():
        raise SystemExit(f"{ARCHIVE_ROOT}: not found; run `dvc repro index` first")

    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_classifier(args.backbone, 2, {"kind": "linear", "hidden": 1, "dropout": 0.0})
    model.backbone.load_state_dict(pretrained_backbone_state(args.backbone, "pretrained"))
    if args.strategy == "frozen":
        # "ConvNet as fixed feature extractor": no gradients for the backbone; it still runs in
        # train mode each epoch, as in the tutorial.
        for parameter in model.backbone.parameters():
            parameter.requires_grad = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    waited = [0.0]
    best = train_model(model, recipe_loaders(args.backbone, 4, args.workers), nn.CrossEntropyLoss(), optimizer,
                       scheduler, args.epochs, waited)
    seconds = time.perf_counter() - started
    print(f"recipe {args.strategy} {args.backbone}: {args.epochs} epochs in {seconds:.1f} s "
          f"({waited[0]:.1f} s waiting for data), best val accuracy {best:.4f} (chosen on the val images themselves)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "data_seconds": waited[0], "best_val_accuracy": best}))


if __name__ == "__main__":
    main()
