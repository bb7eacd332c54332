"""Known wrong labels, found or not: the suspects stage's out-of-fold confident learning against
the in-sample top losses of a head trained on the very labels, in one run.

    python -m bench.label_noise [--archives hymenoptera_data,trashnet,blood_cells] [--shares 0.02,0.05,0.1]

Run it in a throwaway clone (git clone, link .venv); the archives are ../shared/datasets/*.zip.
For each archive the pipeline runs to the features stage (`dvc exp run ... features`); then, in
this process, for each share a seeded draw of that share of the train split's images gets
another class (uniformly among the others), and both methods rank train + val with the run's
head settings (params.yaml):
- out-of-fold: what the suspects stage does (suspects.folds heads; lib/suspects.py);
- in-sample: one head trained on all of train for train.head_epochs, its loss on each image
  (evaluate's top_losses.csv; the real train stage also picks the best epoch on val, which
  changes little for a head).
Each method's top K (K = the number of flipped labels) is scored: precision (share of the K that
were flipped) and recall (share of the flipped in the K), equal here since the list is K long;
"recall at 2K" too. And the estimate of wrong labels confident learning gives (flipped labels
plus the ones the archive came with). Writes bench/results/label_noise.md and docs/stages.md's
`label-noise` block.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.defaults import SHARED
from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib.classifier import head_config, make_head
from stages.lib.folds import out_of_fold_probabilities
from stages.lib.head import feature_probabilities, head_layers
from stages.lib.index_table import read_classes
from stages.lib.params import load_params
from stages.lib.suspects import estimated_label_errors, label_suspects
from stages.lib.training import fit_head, head_settings, make_run
from stages.suspects import train_and_val

RESULTS = Path("bench/results/label_noise.md")


def flipped_labels(labels: np.ndarray, train: int, share: float, classes: int, seed: int = 0):
    """Labels with `share` of the first `train` images moved to another class; and which."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(train, max(1, round(share * train)), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    return noisy, flipped


def in_sample_losses(split: dict, train: int, params, classes: int) -> np.ndarray:
    """-log p(given label) of every image under one head trained on the first `train` images."""
    keep = np.arange(len(split["labels"])) < train
    rest = {**split, "features": split["features"][keep], "labels": split["labels"][keep]}
    torch.manual_seed(params.train.seed)
    head = make_head(split["features"].shape[-1], classes, **head_config(params.model))
    run = make_run(params, torch.device("cpu"), torch.from_numpy(rest["labels"]), classes)
    for _ in fit_head(head, rest, split, run, 1, head_settings(params)):
        pass
    probs = feature_probabilities(head_layers(head.state_dict()), split, params.model.tta)
    return -np.log(np.maximum(probs[np.arange(len(probs)), split["labels"]], 1e-12))


def scores(ranked: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    """Recall of the flipped among the top K and the top 2K (K = how many were flipped)."""
    k, truth = len(flipped), set(flipped.tolist())
    return (len(truth & set(ranked[:k].tolist())) / k, len(truth & set(ranked[: 2 * k].tolist())) / k)


def measure(archive: str, shares: list[float]) -> list[dict]:
    run_on_archive(SHARED / f"{archive}.zip", targets=["features"])
    params, classes = load_params(), len(read_classes())
    split, paths, splits = train_and_val()
    train = splits.count("train")
    rows = []
    for share in shares:
        noisy, flipped = flipped_labels(split["labels"], train, share, classes)
        data = {**split, "labels": noisy}
        probs, _ = out_of_fold_probabilities(data, params, classes)
        found, _ = label_suspects(probs, noisy, classes)
        errors = estimated_label_errors(probs, noisy, classes)
        by_loss = np.argsort(-in_sample_losses(data, train, params, classes), kind="stable")
        row = {"archive": archive, "images": len(noisy), "share": share, "flipped": len(flipped),
               "suspects": len(found), "estimated": float(errors.sum() - np.trace(errors)),
               "oof": scores(found, flipped), "in_sample": scores(by_loss, flipped)}
        print(row, flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.label_noise` (one run; "
             "a seeded share of the train split's labels moved to another class; the head settings of params.yaml "
             "on the pretrained Lite2's cached features; K = the number flipped). Recall at K is also the "
             "precision at K.", "",
             "| archive | flipped | out-of-fold suspects: recall at K | at 2K | in-sample top losses: recall at K | "
             "at 2K | suspects listed | wrong labels estimated |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['archive']} ({r['images']} train + val) | {r['share']:.0%} ({r['flipped']}) | "
                     f"**{r['oof'][0]:.3f}** | {r['oof'][1]:.3f} | {r['in_sample'][0]:.3f} | {r['in_sample'][1]:.3f} | "
                     f"{r['suspects']} | {r['estimated']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archives", default="hymenoptera_data,trashnet,blood_cells")
    parser.add_argument("--shares", default="0.02,0.05,0.1")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    rows = []
    with restored_workspace():
        for archive in args.archives.split(","):
            rows += measure(archive, shares)
    publish("label-noise", table(rows), RESULTS)


if __name__ == "__main__":
    main()
