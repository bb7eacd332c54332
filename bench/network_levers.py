"""What the network phase's first epochs do, under each lever that may explain why they fall
below the head on photos of objects.

    python -m bench.network_levers [--archives trashnet,blood_cells]

Run it in a throwaway clone (git clone, link .venv); the archives are ../shared/datasets/*.zip.
For each archive the data stages and the features run first (`dvc exp run ... features`), then
each setting trains in this process as the train stage would (`train_and_calibrate`) with
strategy finetune, so that every network epoch is seen (auto would stop at the first that does
not improve), and the setting's overrides of params.yaml:
- default:         the committed network settings (train.backbone_lr_mult, one-cycle, 160 px crops,
                   train.epochs, train.trainable_fraction);
- lr x 1/3:        the backbone (and the head under it) at a third of the default's learning rate;
- lr x 1/3, cosine: and no warm-up: the rate falls from its peak (one-cycle peaks inside epoch 1;
                   train.scheduler is the head phase's too, so the head changes a little);
- lr x 1/3, crops 0.5-1: and gentler zoom (the random crops keep half the image or more);
- layer decay 0.1: the default's rate for the backbone's last layers, falling geometrically to a
                   tenth of it at the first (train.layer_decay), so that the generic early
                   features move least.
- last 3/4 at 192 px for 4 epochs: only the last three quarters of the backbone's weights train
                   (train.trainable_fraction; the early layers run forward only), which makes a
                   step about 1.5x cheaper (bench.network_speed), spent on larger crops and an
                   epoch more; scored at 224 px;
- last 3/4 for 5 epochs: the same saving spent on two more epochs at the default's 160 px;
- last 95% for 4 or 5 epochs: only the stem and the first three of Lite2's seven stages of blocks
                   (4% of the weights, but the highest-resolution layers, a large share of a
                   step's work) run forward only, the saving spent on one or two more epochs.
`--settings` picks some of them (comma-separated names). It prints the head's best val accuracy,
the val accuracy after each network epoch (scored as the train stage scores it: at
train.eval_size), and the last network epoch's val
accuracy at smaller evaluation sizes (the resize and crop scaled together), which is where a
train/test resolution discrepancy (Touvron et al., "Fixing the train-test resolution
discrepancy", NeurIPS 2019) would show. Writes bench/results/network_levers.md and the
`network-levers` block of docs/speed.md. The test split is never read.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib import records as records_lib
from stages.lib.backbones import read_pretrained
from stages.lib.data import ImageDataset, decode_size, eval_transform, make_loader
from stages.lib.index_table import read_split
from stages.lib.inference import loader_probabilities
from stages.lib.params import load_params
from stages.lib.paths import PRETRAINED
from stages.lib.training import train_and_calibrate

RESULTS = Path("bench/results/network_levers.md")
SETTINGS = {
    "default": {},
    "lr x 1/3": {"backbone_lr_mult": 0.1},
    "lr x 1/3, cosine": {"backbone_lr_mult": 0.1, "scheduler": "cosine"},
    "lr x 1/3, crops 0.5-1": {"backbone_lr_mult": 0.1, "crop_scale": (0.5, 1.0)},
    "layer decay 0.1": {"layer_decay": 0.1},
    "last 3/4 at 192 px for 4 epochs": {"trainable_fraction": 0.75, "image_size": 192, "eval_size": 224, "epochs": 4},
    "last 3/4 for 5 epochs": {"trainable_fraction": 0.75, "epochs": 5},
    "last 95% for 4 epochs": {"trainable_fraction": 0.95, "epochs": 4},
    "last 95% for 5 epochs": {"trainable_fraction": 0.95, "epochs": 5},
}
EVAL_SIZES = (160, 192, 224)  # beside the backbone's own


def train_with(overrides: dict) -> tuple[float, list[float], dict, float]:
    """The head's best val accuracy, each network epoch's, the last network epoch's at EVAL_SIZES,
    and the seconds training took (both phases and the temperature)."""
    params = load_params()
    augment = params.augment.model_copy(update={k: v for k, v in overrides.items() if k == "crop_scale"})
    train = params.train.model_copy(update={k: v for k, v in overrides.items() if k != "crop_scale"})
    params = params.model_copy(update={"strategy": "finetune", "augment": augment, "train": train})
    last = {}
    record = records_lib.Records.record

    def keeping_the_last_network_epoch(self, result, model, eligible=True):
        record(self, result, model, eligible)
        if result.phase == "network":
            last["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    records_lib.Records.record = keeping_the_last_network_epoch
    started = time.perf_counter()
    try:
        trained = train_and_calibrate(params, torch.device("cpu"))
    finally:
        records_lib.Records.record = record
    seconds = time.perf_counter() - started
    history = trained.records.history
    head = max(r.val_acc for r in history if r.phase == "head")
    network = [r.val_acc for r in history if r.phase == "network"]
    return head, network, val_at_sizes(trained.checkpoint, last["state"]), seconds


def val_at_sizes(checkpoint, state: dict) -> dict[int, float]:
    model = replace(checkpoint, state_dict=state).classifier()
    rows, prep = read_split("val"), checkpoint.preprocessing
    accuracy = {}
    for size in EVAL_SIZES:
        scaled = replace(prep, input_size=size, resize_size=round(size * prep.resize_size / prep.input_size))
        loader = make_loader(ImageDataset(rows, eval_transform(scaled), decode_size(scaled)), 16, None, 2, False,
                             persistent=False)
        probs, labels = loader_probabilities(model, loader, torch.device("cpu"), checkpoint.tta, desc=f"val at {size}")
        accuracy[size] = float((probs.argmax(1) == labels).mean())
    return accuracy


def table(rows: list[dict], input_size: dict[str, int]) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.network_levers` (one run; "
             "strategy finetune, 30 head epochs then the network's; val accuracy, the test split unread). "
             f"Network epochs: val accuracy after each, at train.eval_size ({load_params().train.eval_size} px "
             "unless the setting says); then the last at each evaluation size; training's seconds (both phases).",
             "", "| archive | setting | head (best) | network epochs | "
             + " | ".join(f"last at {s} px" for s in EVAL_SIZES) + " | seconds |",
             "|---|---|---|---|" + "---|" * len(EVAL_SIZES) + "---|"]
    for row in rows:
        epochs = ", ".join(f"{v:.3f}" for v in row["network"])
        lines.append(f"| {row['archive']} ({input_size[row['archive']]} px) | {row['setting']} | {row['head']:.3f} | "
                     f"{epochs} | " + " | ".join(f"{row['sizes'][s]:.3f}" for s in EVAL_SIZES)
                     + f" | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archives", default="trashnet,blood_cells")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}
    rows, input_size = [], {}
    with restored_workspace():
        for name in args.archives.split(","):
            run_on_archive(SHARED / f"{name}.zip", targets=["features"])
            input_size[name] = read_pretrained(PRETRAINED)["preprocessing"]["input_size"]
            for setting, overrides in settings.items():
                head, network, sizes, seconds = train_with(overrides)
                rows.append({"archive": name, "setting": setting, "head": head, "network": network, "sizes": sizes,
                             "seconds": seconds})
                print(f"{name} {setting}: head {head:.3f}, network {[round(v, 3) for v in network]}, "
                      f"last at {sizes}, {seconds:.0f} s", flush=True)
    publish("network-levers", table(rows, input_size), RESULTS)


if __name__ == "__main__":
    main()
