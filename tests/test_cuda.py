"""The path this project exists for, on a GPU: train, evaluate and export a few steps on CUDA, in the
mixed precision `train.amp: auto` chooses there. Skipped where no CUDA device is visible (every
machine here); the first run on a GPU machine checks it."""

from __future__ import annotations

import json

import pytest
import torch

from stages import evaluate, export, export_backbone, train
from stages.lib import runtime
from stages.lib.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def test_autocast_on_cuda_is_what_amp_auto_chooses():
    cuda = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with runtime.autocast(cuda, amp="auto"):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == dtype
    # fp16 needs loss scaling; bf16 does not
    assert runtime.grad_scaler(cuda, "auto").is_enabled() == (dtype == torch.float16)


def test_train_evaluate_and_export_on_the_gpu(tiny_project, caplog):
    root = tiny_project(strategy="finetune",
                        train={"head_epochs": 1, "epochs": 2, "amp": "auto", "workers": 1, "compile": False})
    caplog.set_level("INFO")
    train.main()
    assert "device cuda" in caplog.text
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert all(torch.isfinite(t).all() for t in checkpoint.state_dict.values() if t.is_floating_point())
    evaluate.main()  # a fine-tuned backbone: the test images run through the whole network on the GPU
    assert json.loads((root / "metrics/eval/summary.json").read_text())["images"] > 0
    export_backbone.main()
    export.main()
    from tests.test_export import check_exports_match_pytorch

    size = json.loads((root / "models/export/model.json").read_text())["input_size"]
    check_exports_match_pytorch(root, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
