"""End to end: `dvc repro` in a temporary copy of the project, on a tiny generated archive."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, deep_merge, tiny_training_params, write_gradient_image, write_random_backbone, zip_tree


def run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def pipeline_copy(tmp_path) -> tuple[Path, dict]:
    """A git+DVC project holding this project's stages, whose data.url names a tiny archive
    that only $DATA_MIRROR has."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, work / name)
    shutil.copytree(PROJECT_ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))

    mirror = tmp_path / "mirror"
    source = tmp_path / "source"
    for split, first, count in (("train", 0, 8), ("val", 8, 3)):
        for i in range(first, first + count):
            write_gradient_image(source / f"tiny_data/{split}/ants/a{i}.png", (200, 10 * i, 20))
            write_gradient_image(source / f"tiny_data/{split}/bees/b{i}.png", (10 * i, 40, 200))
    mirror.mkdir()
    write_random_backbone(work / "tiny_backbone.pt")
    zip_tree(source, mirror / "tiny_data.zip")

    params = deep_merge(
        yaml.safe_load((work / "params.yaml").read_text()),
        tiny_training_params("tiny_backbone.pt", data={"url": "https://example.invalid/datasets/tiny_data.zip", "sha256": None}),
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, DATA_MIRROR=str(mirror))
    # dvc.yaml says `python -m stages X`: it must be the interpreter running the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.invalid"],
                 ["git", "config", "user.name", "test"], ["dvc", "init", "-q"],
                 ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "project"]):
        run(args, work, env)
    return work, env


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_dvc_repro_end_to_end(pipeline_copy):
    work, env = pipeline_copy
    output = run(["dvc", "repro"], work, env)
    assert "using offline copy" in output and "tiny_data.zip" in output
    assert sorted(stages_run(output)) == sorted(["download", "index", "weights", "features", "train", "evaluate",
                                                 "export_backbone", "export"])

    summary = json.loads((work / "metrics/data.json").read_text())
    assert summary["counts"]["test"]["total"] == 6 and summary["images"] == 22
    assert json.loads((work / "metrics/eval.json").read_text())["images"] == 6
    assert (work / "models/model.pt").is_file() and (work / "metrics/predictions.csv").is_file()

    assert json.loads(run(["dvc", "status", "--json"], work, env)) == {}
    again = run(["dvc", "repro"], work, env)
    assert stages_run(again) == [] and "didn't change, skipping" in again

    # An experiment on the strategy reruns only train and evaluate, and `dvc exp show` lists it.
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    experiment = run(["dvc", "exp", "run", "-S", "strategy=finetune", "-n", "try-finetune"], work, env)
    assert stages_run(experiment) == ["train", "evaluate", "export"]
    # A frozen experiment on the head's learning rate reuses the features and scores on them.
    experiment = run(["dvc", "exp", "run", "-S", "strategy=frozen", "-S", "train.lr=0.003", "-n", "try-lr"], work, env)
    assert stages_run(experiment) == ["train", "evaluate", "export"] and "cached test features" in experiment
    assert "joining its export" in experiment  # the backbone's export is reused, not rebuilt
    shown = run(["dvc", "exp", "show", "--csv", "--no-pager"], work, env)
    header, *rows = shown.strip().splitlines()
    assert "strategy" in header and "accuracy" in header
    assert any("try-finetune" in row and "finetune" in row for row in rows)
    assert any("try-lr" in row and "0.003" in row for row in rows)

    # A param only the index reads reruns the index and what depends on it, not the download.
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["index"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], work, env)) == ["index", "features", "train", "evaluate", "export"]

    # Metrics are git-tracked, so commits compare without a DVC remote.
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "another seed"], work, env)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], work, env))
    assert diff["metrics/train/metrics.json"]["train.loss"]["diff"] != 0

    # Sweeps: queue two experiments, run them two at a time; both land in `dvc exp show`.
    for lr in ("0.004", "0.006"):
        run(["dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}", "-n", f"sweep-{lr}"], work, env)
    run(["dvc", "queue", "start", "--jobs", "2"], work, env)
    deadline = time.monotonic() + 300
    while True:
        status = run(["dvc", "queue", "status"], work, env)
        assert "Failed" not in status, status + run(["dvc", "queue", "logs", "sweep-0.004"], work, env)
        if status.count("Success") >= 2:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    shown = run(["dvc", "exp", "show", "--csv", "--no-pager"], work, env)
    for lr in ("0.004", "0.006"):
        row = next(row for row in shown.splitlines() if f"sweep-{lr}" in row)
        assert lr in row and "," in row

    # Remote storage: push to a local-directory remote, clone, pull; then nothing to reproduce.
    remote = work.parent / "remote"
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "remote"], work, env)
    run(["dvc", "push"], work, env)
    clone = work.parent / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], work.parent, env)
    run(["dvc", "pull"], clone, env)
    for path in ("data/raw/tiny_data/train/ants", "models/pretrained.pt", "models/model.pt", "data/features/test.pt"):
        assert (clone / path).exists(), path
    assert stages_run(run(["dvc", "repro"], clone, env)) == []
