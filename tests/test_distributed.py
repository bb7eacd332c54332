"""Training under torchrun: two CPU processes (gloo) give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from stages.lib.files import read_tensors
from tests.conftest import PROJECT_ROOT


def train_in(root, env, processes: int, batch_size: int) -> tuple[dict, dict]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["batch_size"] = batch_size
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    launcher = [sys.executable, "-m", "stages.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "stages.train"]
    result = subprocess.run(launcher, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    curves = {name: [float(line.split("\t")[-1]) for line in
                     (root / f"metrics/train/plots/metrics/{name}.tsv").read_text().splitlines()[1:]]
              for name in ("train/loss", "train/acc", "val/loss", "val/acc")}
    summary = json.loads((root / "metrics/train/metrics.json").read_text())
    tensors, _ = read_tensors(root / "models/model.safetensors")
    return {"summary": summary, "curves": curves}, {"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}


@pytest.mark.slow
def test_two_gloo_processes_train_as_one_process_with_their_summed_batch(tiny_project):
    # 16 training images: two processes of 4 images per step see exactly one process's 8. In full
    # precision: bf16 autocast (on CPUs with AMX) rounds the two differently batched sums
    # apart by more than the tolerance below.
    root = tiny_project(strategy="finetune", index={"split_ratios": [8 / 14, 3 / 14, 3 / 14]}, model={"dropout": 0.0},
                        train={"head_epochs": 2, "epochs": 2, "workers": 0, "lr": 0.01, "amp": False})
    import pandas as pd

    assert (pd.read_csv(root / "data/index.csv").split == "train").sum() == 16
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    single, single_model = train_in(root, env, processes=1, batch_size=8)
    double, double_model = train_in(root, env, processes=2, batch_size=4)

    # Every epoch, the network's three included: losses and accuracies reduced over both processes.
    assert len(single["curves"]["train/loss"]) == 2 + 2
    for name, values in single["curves"].items():
        assert double["curves"][name] == pytest.approx(values, abs=1e-4), name
    assert double["summary"]["best_epoch"] == single["summary"]["best_epoch"]
    for name, tensor in single_model["state_dict"].items():
        torch.testing.assert_close(double_model["state_dict"][name], tensor, atol=1e-4, rtol=1e-3, msg=name)
