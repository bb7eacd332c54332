"""The defaults against the settings before them, on the three datasets, in one run (issue 14).

    python -m bench.defaults [--archives hymenoptera_data,blood_cells,trashnet]

Run it in a throwaway clone with its own, empty DVC cache (git clone, link .venv); the archives
are ../shared/datasets/*.zip. For each archive the data stages and the features run first, timed
("prelude": for hymenoptera, prelude + new default is a fresh clone's `dvc repro` from an empty
cache, less `make`'s install), then four experiments, each params.yaml as committed with only
these overrides:
- old default:  the frozen strategy, as params.yaml had it before;
- new default:  params.yaml as committed;
- 3 epochs of every weight: the default before the last one: the network phase trains every weight of
                the backbone for 3 epochs (params.yaml's other settings);
- old finetune: strategy finetune with the network settings from before (every weight trains,
                at the backbone's input size (and scored there), 4 epochs, the backbone at 0.1 x train.lr, 30 head
                epochs, bf16 autocast wherever the CPU has bf16 instructions): the issue's 969 s on
                blood cells;
- new finetune: strategy finetune with params.yaml's network settings and 10 epochs: where
                minutes are there to spend (no gate on val, no early stop).
It reports test accuracy and macro-F1, the train stage's seconds (metrics/train/time.json), the
whole `dvc exp run` (the stages that reran: train, evaluate, export), the network epochs run and
the best one, and the network phase's images per second (train images x network epochs / the
seconds of its steps and of waiting for data), and the val curves: the head's best val accuracy
and the val accuracy after each network epoch. Writes bench/results/defaults.md and README's
`defaults` block, and the val curves to bench/results/defaults_curves.md and docs/speed.md's
`defaults-curves` block.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from datetime import date
from pathlib import Path

import pandas as pd

from bench.publish import machine, publish
from bench.workspace import restored_workspace, run_on_archive
from stages.lib.params import load_params

RESULTS = Path("bench/results/defaults.md")
CURVES = Path("bench/results/defaults_curves.md")
PARTIAL = RESULTS.with_suffix(".partial.json")
SHARED = Path("../shared/datasets")
OLD_NETWORK = ["train.trainable_fraction=1.0", "train.image_size=null", "train.epochs=4", "train.backbone_lr_mult=0.1",
               "train.head_epochs=30", "train.time_budget=null", "train.amp=true", "train.eval_size=null"]
SETTINGS = {
    "old default": ["strategy=frozen", "train.head_epochs=30"],
    "new default": [],
    "3 epochs of every weight": ["train.trainable_fraction=1.0", "train.epochs=3"],
    "old finetune": ["strategy=finetune", *OLD_NETWORK],
    "new finetune": ["strategy=finetune", "train.epochs=10"],
}


def read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def val_curves(acc_tsv: str, params) -> tuple[float | None, list[float]]:
    """The head phase's best val accuracy (None without one) and the val accuracy after each epoch
    of the whole network, from a run's DVCLive val/acc.tsv and the params it ran with (step =
    epoch - 1; the network's first epoch is head_epochs + 1 after a head phase)."""
    steps = [(int(step), float(acc)) for step, acc in (line.split("\t") for line in acc_tsv.strip().splitlines()[1:])]
    if params.strategy == "frozen":
        return max(acc for _, acc in steps), []
    first = 0 if params.strategy == "scratch" else params.train.head_epochs
    head = [acc for step, acc in steps if step < first]
    return (max(head) if head else None), [acc for step, acc in steps if step >= first]


def committed_params() -> None:
    """`dvc exp run` leaves its params in the workspace: each run starts from the committed ones."""
    subprocess.run(["git", "checkout", "--", "params.yaml"], check=True)


def measure(archive: Path, name: str) -> dict:
    committed_params()
    wall = run_on_archive(archive, SETTINGS[name])
    evaluation, timing = read_json("metrics/eval.json"), read_json("metrics/train/time.json")
    images = int((pd.read_csv("data/index.csv")["split"] == "train").sum())
    # load_params: as the experiment ran it (dvc exp run applied its -S to params.yaml)
    head_val, curve = val_curves(Path("metrics/train/plots/metrics/val/acc.tsv").read_text(), load_params())
    epochs = len(curve)
    network_seconds = timing.get("compute", 0) + timing.get("data", 0)
    row = {"archive": archive.stem, "setting": name, "accuracy": evaluation["accuracy"],
           "macro_f1": evaluation["macro_f1"], "train": timing["total"], "wall": wall, "network_epochs": epochs,
           "head_val": head_val, "val_curve": curve,
           "images_per_s": images * epochs / network_seconds if epochs else None,
           "best_epoch": read_json("metrics/train/metrics.json")["best_epoch"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], preludes: dict[str, float], day: str) -> str:
    baseline = {r["archive"]: r["train"] for r in rows if r["setting"] == "old finetune"}
    lines = [f"Measured {day} on {machine()}, by "
             "`python -m bench.defaults` "
             "in one run. Each archive's data stages and features ran first, from an empty cache ("
             + ", ".join(f"{stem} {seconds:.0f} s" for stem, seconds in preludes.items())
             + "); the times below are the runs after them.", "",
             "| archive | setting | test accuracy | macro-F1 | train stage (/ old finetune's) | whole `dvc exp run` | "
             "network epochs (best epoch) | network phase |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['images_per_s']:.1f} images/s" if r["images_per_s"] else "-"
        ratio = f" ({r['train'] / baseline[r['archive']]:.2f})" if r["archive"] in baseline else ""
        lines.append(f"| {r['archive']} | {r['setting']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['train']:.0f} s"
                     f"{ratio} | {r['wall']:.0f} s | {r['network_epochs']} ({r['best_epoch']}) | {speed} |")
    return "\n".join(lines)


def curves_table(rows: list[dict], day: str) -> str:
    lines = [f"From the `python -m bench.defaults` run of README.md's results table ({day}, "
             f"{machine()}). Val accuracy of the head (its best epoch) and after each "
             "network epoch (at the size the run scored it; auto stops at the first network epoch that is not its "
             "phase's best so far, and a network epoch is the model only if it gets more val images right than the "
             "head):", "", "| archive | setting | head | network epochs |", "|---|---|---|---|"]
    lines += [f"| {r['archive']} | {r['setting']} | {r['head_val']:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in r['val_curve'])} |" for r in rows if r.get("val_curve")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", default="hymenoptera_data,blood_cells,trashnet")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="a comma-separated subset, for trying it out")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the last run's measurements (bench/results/defaults.partial.json)")
    args = parser.parse_args()
    if args.table_only:
        measured = json.loads(PARTIAL.read_text())
        publish_tables(measured["rows"], measured["preludes"], measured["date"])
        return
    rows, preludes, day = [], {}, date.today().isoformat()
    with restored_workspace():
        for stem in args.archives.split(","):
            archive = SHARED / f"{stem}.zip"
            committed_params()
            preludes[stem] = run_on_archive(archive, [], ["features"])
            for name in args.settings.split(","):
                rows.append(measure(archive, name))
                PARTIAL.write_text(json.dumps({"date": day, "preludes": preludes, "rows": rows}))
    publish_tables(rows, preludes, day)


def publish_tables(rows: list[dict], preludes: dict[str, float], day: str) -> None:
    """The tables, dated by the run that measured them (--table-only republishes an earlier run)."""
    publish("defaults", table(rows, preludes, day), RESULTS)
    publish("defaults-curves", curves_table(rows, day), CURVES)


if __name__ == "__main__":
    main()
