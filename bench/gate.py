"""Which rule should adopt a network epoch over the head (strategy auto)? Test accuracy of each
rule, over the three archives and a few seeds.

    python -m bench.gate [--archives hymenoptera_data,blood_cells,trashnet] [--seeds 0,1,2]

Run it in a throwaway clone (git clone, link .venv); the archives are ../shared/datasets/*.zip.
For each archive the data stages and the features run first; then, per train.seed, the train
stage's training runs in this process with strategy finetune and train.patience 0 (every network
epoch of train.epochs is seen), and each candidate model is scored on val and test: the head
phase's best head (on the cached features) and each network epoch, at the backbone's input size
and at smaller evaluation sizes. The rules then pick a model from the val scores alone; the test
split only reports what each pick scores:
- head:            the head; the frozen strategy's model;
- McNemar p<0.05:  auto before this bench: network epochs while each improves on the phase's best val
                   score, adopted only if significantly better than the head (McNemar's exact test);
- McNemar p<0.25:  the same with a weaker gate;
- plain:           auto's epochs, adopted if its val accuracy beats the best so far (ties to the head);
- plain + size:    the same, each network epoch at the evaluation size with the best val accuracy;
- plain at 192:    the same, every network epoch at 192 px (train.eval_size 192);
- best network:    the network epoch with the best val accuracy, the head never (strategy finetune).
The measurements go to bench/results/gate.json (`--table-only` recomputes the table from them);
the table to bench/results/gate.md and the `gate` block of docs/model.md.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib import training
from stages.lib.backbones import read_pretrained
from stages.lib.data import ImageDataset, decode_size, eval_transform, make_loader
from stages.lib.features import read_features
from stages.lib.head import feature_probabilities, head_layers
from stages.lib.index_table import read_split
from stages.lib.inference import loader_probabilities
from stages.lib.params import load_params
from stages.lib.paths import PRETRAINED
from stages.lib.preprocessing import Preprocessing
from stages.lib.significance import mcnemar_exact

RESULTS = Path("bench/results/gate.md")
MEASURED = RESULTS.with_suffix(".json")
SMALLER_SIZES = [224, 192]  # evaluation sizes tried beside the backbone's input size (--sizes)


def right_at_sizes(model, prep: Preprocessing, tta: str) -> dict:
    """Per evaluation size, per split (val, test): which images the model gets right."""
    right = {}
    for size in (prep.input_size, *SMALLER_SIZES):
        scaled = prep.at_size(size)
        for split in ("val", "test"):
            rows = read_split(split)
            loader = make_loader(ImageDataset(rows, eval_transform(scaled), decode_size(scaled)), 16, None, 2, False,
                                 persistent=False)
            probs, labels = loader_probabilities(model, loader, torch.device("cpu"), tta, desc=f"{split} at {size}")
            right.setdefault(str(size), {})[split] = (probs.argmax(1) == labels).tolist()
    return right


def head_right(head_state: dict, tta: str) -> dict:
    layers = head_layers(head_state)
    right = {}
    for split in ("val", "test"):
        cached = read_features(split)
        right[split] = (feature_probabilities(layers, cached, tta).argmax(1) == cached["labels"]).tolist()
    return right


def measure(seed: int) -> dict:
    """Train with strategy finetune; which val and test images the best head and each network epoch get right."""
    params = load_params()
    params = params.model_copy(update={"strategy": "finetune",
                                       "train": params.train.model_copy(update={"seed": seed, "patience": 0})})
    prep = Preprocessing.from_dict(read_pretrained(PRETRAINED)["preprocessing"])
    tta = params.model.tta
    measured = {"seed": seed, "input_size": prep.input_size, "network": []}
    fit_network, network_phase = training.fit_network, training.network_phase

    def with_head_scored(model, *args, **kwargs):
        measured["head"] = head_right(model.head.state_dict(), tta)  # the head phase's best, restored
        return network_phase(model, *args, **kwargs)

    def with_epochs_scored(model, *args, **kwargs):
        for epoch in fit_network(model, *args, **kwargs):
            measured["network"].append({"val_acc": epoch.result.val_acc, **right_at_sizes(model, prep, tta)})
            yield epoch

    training.fit_network, training.network_phase = with_epochs_scored, with_head_scored
    try:
        training.train_and_calibrate(params, torch.device("cpu"))
    finally:
        training.fit_network, training.network_phase = fit_network, network_phase
    return measured


def accuracy(right: list[bool]) -> float:
    return float(np.mean(right))


def significantly_better(head: list[bool], network: list[bool], alpha: float) -> bool:
    only_head = sum(h and not n for h, n in zip(head, network))
    only_network = sum(n and not h for h, n in zip(head, network))
    return only_network > only_head and mcnemar_exact(only_head, only_network) < alpha


def auto_pick(run: dict, eligible, size_of) -> tuple[str, dict]:
    """auto's walk: network epochs while each beats the phase's best val accuracy so far; the
    model is the head unless an eligible epoch beats the best so far. Returns (size, right) of the pick."""
    pick, best_val, phase_best = run["head"], accuracy(run["head"]["val"]), -1.0
    for epoch in run["network"]:
        size = size_of(epoch)
        right = epoch[size]
        val = accuracy(right["val"])
        if eligible(right) and val > best_val:
            pick, best_val = right, val
        if val <= phase_best:
            break
        phase_best = val
    return pick


RULES = {
    "head": lambda run, base: run["head"],
    "McNemar p<0.05": lambda run, base: auto_pick(
        run, lambda r: significantly_better(run["head"]["val"], r["val"], 0.05), base),
    "McNemar p<0.25": lambda run, base: auto_pick(
        run, lambda r: significantly_better(run["head"]["val"], r["val"], 0.25), base),
    "plain": lambda run, base: auto_pick(run, lambda r: True, base),
    "plain + size": lambda run, base: auto_pick(
        run, lambda r: True, lambda epoch: max(sorted(k for k in epoch if k != "val_acc"),
                                               key=lambda k: accuracy(epoch[k]["val"]))),
    "plain at 192": lambda run, base: auto_pick(run, lambda r: True, lambda epoch: "192"),
    "best network": lambda run, base: max((e[base(e)] for e in run["network"]), key=lambda r: accuracy(r["val"])),
}


def sizes(runs: list[dict]) -> str:
    return ", ".join(k for k in runs[0]["network"][0] if k != "val_acc")


def table(measured: dict) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.gate` (one run; params.yaml's "
             "network settings, strategy finetune so that every network epoch is seen). Test accuracy of the model "
             "each rule picks from the val scores: the mean, and per train.seed (0, 1, ...). Evaluation sizes "
             "tried by plain + size: " + "; ".join(f"{a} {sizes(runs)}" for a, runs in measured.items()) + " px.", "",
             "| archive | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for archive, runs in measured.items():
        cells = []
        for rule in RULES.values():
            scores = [accuracy(rule(run, lambda epoch, run=run: str(run["input_size"]))["test"]) for run in runs]
            cells.append(f"**{mean(scores):.4f}** (" + ", ".join(f"{s:.3f}" for s in scores) + ")")
        lines.append(f"| {archive} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", default="hymenoptera_data,blood_cells,trashnet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sizes", default="224,192", help="smaller evaluation sizes to score at; '' for none")
    parser.add_argument("--table-only", action="store_true", help=f"the table from {MEASURED}")
    parser.add_argument("--add", action="store_true", help=f"add these archives' runs to those in {MEASURED}")
    args = parser.parse_args()
    if args.table_only:
        publish("gate", table(json.loads(MEASURED.read_text())), RESULTS)
        return
    SMALLER_SIZES[:] = [int(s) for s in args.sizes.split(",") if s]
    measured = json.loads(MEASURED.read_text()) if args.add else {}
    with restored_workspace():
        for name in args.archives.split(","):
            run_on_archive(SHARED / f"{name}.zip", targets=["features"])
            measured[name] = []
            for seed in map(int, args.seeds.split(",")):
                measured[name].append(measure(seed))
                MEASURED.write_text(json.dumps(measured))
                print(f"{name} seed {seed}: {table({name: measured[name]})}", flush=True)
    publish("gate", table(measured), RESULTS)


if __name__ == "__main__":
    main()
