"""End to end: `dvc repro` in a temporary copy of the project, on a tiny generated archive."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    # dvc.yaml says `python -m stages.X`: it must be the interpreter running the tests.
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
    assert stages_run(output) == ["download", "index", "weights", "features", "train", "evaluate"]

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
    assert stages_run(experiment) == ["train", "evaluate"]
    # A frozen experiment on the head's learning rate reuses the features and scores on them.
    experiment = run(["dvc", "exp", "run", "-S", "strategy=frozen", "-S", "train.lr=0.003", "-n", "try-lr"], work, env)
    assert stages_run(experiment) == ["train", "evaluate"] and "cached test features" in experiment
    shown = run(["dvc", "exp", "show", "--csv", "--no-pager"], work, env)
    header, *rows = shown.strip().splitlines()
    assert "strategy" in header and "accuracy" in header
    assert any("try-finetune" in row and "finetune" in row for row in rows)
    assert any("try-lr" in row and "0.003" in row for row in rows)

    # A param only the index reads reruns the index and what depends on it, not the download.
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["index"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], work, env)) == ["index", "features", "train", "evaluate"]

    # Metrics are git-tracked, so commits compare without a DVC remote.
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "another seed"], work, env)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], work, env))
    assert diff["metrics/train/metrics.json"]["train.loss"]["diff"] != 0
