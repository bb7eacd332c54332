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

from tests.conftest import PROJECT_ROOT, make_image_tree, zip_tree


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
    n = make_image_tree(source / "tiny_data" / "train", {"ants": 8, "bees": 8})
    make_image_tree(source / "tiny_data" / "val", {"ants": 3, "bees": 3}, start=n)
    mirror.mkdir()
    zip_tree(source, mirror / "tiny_data.zip")

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["url"] = "https://example.invalid/datasets/tiny_data.zip"
    params["data"]["sha256"] = None
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, DATA_MIRROR=str(mirror))
    # dvc.yaml says `python -m stages.X`: it must be the interpreter running the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.invalid"],
                 ["git", "config", "user.name", "test"], ["dvc", "init", "-q"],
                 ["dvc", "config", "core.analytics", "false"]):
        run(args, work, env)
    return work, env


def test_dvc_repro_end_to_end(pipeline_copy):
    work, env = pipeline_copy
    output = run(["dvc", "repro"], work, env)
    assert "using offline copy" in output and "tiny_data.zip" in output

    summary = json.loads((work / "metrics/data.json").read_text())
    assert summary["counts"]["test"]["total"] == 6
    assert summary["images"] == 22
    assert (work / "data/index.csv").read_text().count("\n") == 23

    status = json.loads(run(["dvc", "status", "--json"], work, env))
    assert status == {}
    again = run(["dvc", "repro"], work, env)
    assert "Running stage" not in again
    assert "didn't change, skipping" in again

    # A param another stage reads reruns only that stage.
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["index"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run(["dvc", "repro"], work, env)
    assert "Running stage 'index'" in rerun and "Running stage 'download'" not in rerun
