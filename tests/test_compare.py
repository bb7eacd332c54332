"""The compare command: two runs' test predictions image by image, from git revisions,
experiments or the workspace."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest

from stages import compare
from stages.lib.cli import UserError


def predictions(right: list[bool], paths: list[str] | None = None) -> str:
    paths = paths or [f"test/img_{i:03d}.png" for i in range(len(right))]
    table = pd.DataFrame({"path": paths, "true": ["cat"] * len(right),
                          "predicted": ["cat" if r else "dog" for r in right], "probability": 0.9})
    return table.to_csv(index=False, lineterminator="\n")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository whose HEAD commits predictions where A got images 0..79 of 100 right."""
    monkeypatch.chdir(tmp_path)
    for args in (["init", "-q"], ["config", "user.email", "t@example.invalid"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], check=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/predictions.csv").write_text(predictions([i < 80 for i in range(100)]))
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", "A"], check=True)
    return tmp_path


def test_a_small_difference_is_no_evidence(repo, capsys):
    from scipy.stats import binomtest

    # B loses images 78, 79 and wins 80..87: 2 only A, 8 only B.
    (repo / "metrics/predictions.csv").write_text(predictions([i < 78 or 80 <= i < 88 for i in range(100)]))
    assert compare.main([]) == 0
    out = capsys.readouterr().out
    assert "A = HEAD: accuracy 0.8000" in out and "B = workspace: accuracy 0.8600" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("A right", "A wrong"))]
    assert table == [["A", "right", "78", "2"], ["A", "wrong", "8", "12"]]
    p = binomtest(2, 10, 0.5).pvalue
    assert f"p = {p:.3g}" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("B - A = +6.00 points, 95% CI [")
    assert last.endswith(f"p = {p:.2g}: no evidence of a difference")


def test_a_clear_difference_between_an_experiment_and_a_branch(repo, capsys):
    subprocess.run(["git", "branch", "-q", "baseline"], check=True)
    (repo / "metrics/predictions.csv").write_text(predictions([i < 95 for i in range(100)]))
    subprocess.run(["git", "commit", "-qam", "B"], check=True)
    # DVC keeps an experiment as a git ref named after it.
    subprocess.run(["git", "update-ref", "refs/exps/ab/cdef0123/bold-lr", "HEAD"], check=True)
    subprocess.run(["git", "reset", "-q", "--hard", "baseline"], check=True)
    compare.main(["baseline", "bold-lr"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("B - A = +15.00 points") and f"p = {2 / 2**15:.2g}: B is better" in last
    compare.main(["bold-lr", "baseline"])
    assert capsys.readouterr().out.strip().endswith("B is worse")


def test_the_paired_interval_is_seeded():
    import numpy as np

    from stages.lib.significance import paired_bootstrap_difference

    a = np.arange(153) % 7 != 0
    b = np.arange(153) % 9 != 0
    assert paired_bootstrap_difference(a, b) == paired_bootstrap_difference(a, b)
    low, high = paired_bootstrap_difference(a, b)
    assert low < b.mean() - a.mean() < high


def test_runs_on_different_test_images_are_refused(repo):
    (repo / "metrics/predictions.csv").write_text(predictions([True] * 100, [f"other/{i}.png" for i in range(100)]))
    with pytest.raises(UserError, match=r"^HEAD and workspace were evaluated on different test images \(100 only in "
                                        r"HEAD, 100 only in workspace\); compare runs that share the test split$"):
        compare.main([])
    with pytest.raises(UserError, match=r"^nonsense: neither a git revision nor a DVC experiment"):
        compare.main(["nonsense"])


# --- summarising a sweep (stages/sweep.py) ---------------------------------------------------------


def shown_experiments(accuracies: dict[str, float]) -> list[dict]:
    """`dvc exp show --json` as DVC 3 prints it: a commit with named experiments."""
    experiments = [{"name": name, "revs": [{"name": name, "rev": f"{i:07x}", "data": {"metrics": {
        "metrics/eval.json": {"data": {"accuracy": acc, "macro_f1": acc - 0.01, "images": 153}}}}}]}
        for i, (name, acc) in enumerate(accuracies.items())]
    experiments.append({"name": "broken", "revs": [{"name": "broken", "error": {"msg": "failed"}, "data": {}}]})
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc1234", "name": "main", "experiments": experiments}]


def test_a_sweep_is_summarised_per_metric(monkeypatch, capsys):
    import json
    import types

    import numpy as np

    from stages import sweep

    accuracies = {"seed-0": 0.95, "seed-1": 0.96, "seed-2": 0.94, "other": 0.5}
    shown = shown_experiments(accuracies)
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=0, stdout=json.dumps(shown), stderr=""))
    assert sweep.main(["seed-"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 experiments: seed-0, seed-1, seed-2")
    values = np.array([0.95, 0.96, 0.94])
    assert f"| accuracy | 3 | {values.mean():.4f} | {values.std(ddof=1):.4f} | 0.9400 | 0.9600 |" in out
    assert "| images | 3 | 153.0000 | 0.0000 |" in out
    with pytest.raises(UserError, match=r"no finished experiment named nope\.\.\.; run them first"):
        sweep.main(["nope"])
