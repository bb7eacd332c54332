"""The head's settings searched on cached features (stages/lib/head_search.py, train.head_search)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from stages import train
from stages.lib.head_search import Trial, search_grid, search_table, winner
from stages.lib.records import EpochResult


def result(acc: float, loss: float, epoch: int = 1) -> EpochResult:
    return EpochResult(epoch, "head", 0.5, 0.8, loss, acc, acc, 0.001)


def test_the_grid_spans_the_configured_settings():
    grid = search_grid(0.001, 0.01)
    assert len(grid) == 15 and (0.001, 0.01) in grid
    assert {lr for lr, _ in grid} == {0.001 * f for f in (0.1, 0.3, 1.0, 3.0, 10.0)}
    assert {wd for _, wd in grid} == {0.001, 0.01, 0.1}
    assert search_grid(0.01, 0.0) == [(0.01 * f, 0.0) for f in (0.1, 0.3, 1.0, 3.0, 10.0)]  # no weight decay stays none


def test_the_winner_has_the_best_val_score_then_the_lowest_val_loss_then_comes_first():
    trials = [Trial(0.1, 0, result(0.90, 0.30)), Trial(0.2, 0, result(0.95, 0.40)), Trial(0.3, 0, result(0.95, 0.35)),
              Trial(0.4, 0, result(0.95, 0.35))]
    assert winner(trials, "accuracy") is trials[2]
    table = search_table(trials, trials[2])
    assert table["chosen"].tolist() == [0, 0, 1, 0] and table["val_loss"].tolist() == [0.30, 0.40, 0.35, 0.35]
    assert search_table([], None).columns.tolist() == ["lr", "weight_decay", "best_epoch", "val_accuracy",
                                                       "val_macro_f1", "val_loss", "chosen"]


@pytest.mark.slow
def test_the_head_phase_trains_the_winning_setting_and_the_table_says_so(tiny_project):
    root = tiny_project(strategy="frozen", train={"head_search": True, "head_epochs": 3})
    train.main()
    table = pd.read_csv(root / "metrics/train/head_search.csv")
    assert len(table) == 15 and table["chosen"].sum() == 1
    chosen = table[table["chosen"] == 1].iloc[0]
    ranked = table.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable")
    assert (chosen["val_accuracy"], chosen["val_loss"]) == (ranked.iloc[0]["val_accuracy"], ranked.iloc[0]["val_loss"])
    # The head phase is the winning trial run again: the same best epoch, to the last digit.
    summary = json.loads((root / "metrics/train/metrics.json").read_text())
    assert (summary["best_epoch"], summary["val_accuracy"], summary["val_loss"]) == \
        (chosen["best_epoch"], chosen["val_accuracy"], chosen["val_loss"])
    first = (root / "metrics/train/head_search.csv").read_bytes()
    train.main()
    assert (root / "metrics/train/head_search.csv").read_bytes() == first  # deterministic


def test_without_the_search_the_table_holds_the_one_setting_trained(tiny_project):
    root = tiny_project(strategy="frozen")
    train.main()
    table = pd.read_csv(root / "metrics/train/head_search.csv")
    summary = json.loads((root / "metrics/train/metrics.json").read_text())
    assert len(table) == 1 and table["chosen"].tolist() == [1]
    params = yaml.safe_load((root / "params.yaml").read_text())["train"]
    assert (table.iloc[0]["lr"], table.iloc[0]["weight_decay"]) == (params["lr"], params["weight_decay"])
    assert (table.iloc[0]["best_epoch"], table.iloc[0]["val_loss"]) == (summary["best_epoch"], summary["val_loss"])
