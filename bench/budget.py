"""What each minute of training buys: test accuracy against train.time_budget (issue 24).

    python -m bench.budget [--archives blood_cells,trashnet] [--minutes 1,2,5,10]

Run it in a throwaway clone (git clone, link .venv) with nothing else running: the budget is
planned on the machine's pace. The archives are ../shared/datasets/*.zip. For each archive the
data stages and the features run first; then `dvc exp run ... evaluate` with the frozen strategy
(the head alone: the point a budget starts from), and with strategy finetune and
train.time_budget at each number of minutes (finetune, not auto: every minute goes to the
network phase, whose learning rate falls to zero at the budget's end; auto would take the
better of the head and that on val). It reports the train stage's seconds (metrics/train/time.json,
against the budget), the network phase's steps and test accuracy and macro-F1. Writes
bench/results/budget.md, bench/results/budget.png and the `budget` block of docs/speed.md.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.defaults import SHARED, committed_params, read_json  # noqa: E402
from bench.publish import machine, publish  # noqa: E402
from bench.workspace import restored_workspace, run_on_archive  # noqa: E402

RESULTS = Path("bench/results/budget.md")
MEASURED = RESULTS.with_suffix(".json")
PLOT = RESULTS.with_suffix(".png")


def measure(archive: Path, minutes: float | None) -> dict:
    committed_params()
    settings = ["strategy=frozen"] if minutes is None else ["strategy=finetune", f"train.time_budget={minutes * 60:g}"]
    run_on_archive(archive, settings, ["evaluate"])
    evaluation, metrics = read_json("metrics/eval.json"), read_json("metrics/train/metrics.json")
    row = {"archive": archive.stem, "minutes": minutes, "train": read_json("metrics/train/time.json")["total"],
           "steps": metrics.get("network_steps", 0), "best_epoch": metrics["best_epoch"],
           "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.budget` (one run). The head "
             "alone (strategy frozen), then strategy finetune with `train.time_budget` at each number of minutes; "
             "train stage: its seconds (metrics/train/time.json), against the budget.", "",
             "| archive | budget | train stage | network steps | test accuracy | macro-F1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        budget = "head alone" if r["minutes"] is None else f"{r['minutes']:g} min"
        share = "" if r["minutes"] is None else f" ({r['train'] / (60 * r['minutes']):.0%})"
        lines.append(f"| {r['archive']} | {budget} | {r['train']:.0f} s{share} | {r['steps']} | {r['accuracy']:.4f} | "
                     f"{r['macro_f1']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for index, archive in enumerate(dict.fromkeys(r["archive"] for r in rows)):
        color = f"C{index}"
        mine = [r for r in rows if r["archive"] == archive]
        budgeted = [r for r in mine if r["minutes"] is not None]
        axes.plot([r["train"] / 60 for r in budgeted], [r["accuracy"] for r in budgeted], "o-", color=color,
                  label=f"{archive}: finetune, budgeted")
        for head in (r for r in mine if r["minutes"] is None):
            axes.axhline(head["accuracy"], color=color, linestyle="--", linewidth=1,
                         label=f"{archive}: head alone ({head['train']:.0f} s)")
    axes.set_xscale("log")
    axes.set_xlabel("train stage, minutes (log scale)")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"What a minute buys ({machine()})", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: the curves cross the middle
    figure.savefig(PLOT, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", default="blood_cells,trashnet")
    parser.add_argument("--minutes", default="1,2,5,10")
    parser.add_argument("--table-only", action="store_true", help=f"the table and plot from {MEASURED}")
    args = parser.parse_args()
    if args.table_only:
        rows = json.loads(MEASURED.read_text())
    else:
        rows = []
        with restored_workspace():
            for stem in args.archives.split(","):
                archive = SHARED / f"{stem}.zip"
                committed_params()
                run_on_archive(archive, [], ["features"])
                for minutes in [None, *map(float, args.minutes.split(","))]:
                    rows.append(measure(archive, minutes))
                    MEASURED.write_text(json.dumps(rows))
    plot(rows)
    publish("budget", table(rows), RESULTS)


if __name__ == "__main__":
    main()
