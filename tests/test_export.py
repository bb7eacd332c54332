"""Stage `export`: TorchScript and ONNX agree with PyTorch on real photos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from stages import export, train
from stages.data import eval_transform, load_image
from stages.models import Preprocessing

FIXTURES = Path(__file__).parent / "fixtures"


def real_photos(prep: Preprocessing) -> torch.Tensor:
    transform = eval_transform(prep)
    return torch.stack([transform(load_image(path, prep.resize_size)) for path in sorted(FIXTURES.glob("*.jpg"))])


def test_onnx_and_torchscript_match_pytorch_on_real_photos(tiny_project):
    # The real EfficientNet-Lite0 (TF-style "same" padding included), with a head trained briefly.
    root = tiny_project(strategy="frozen", model={"backbone": "efficientnet_lite0", "weights": "pretrained"},
                        train={"head_epochs": 2})
    train.main()
    export.main()
    folder = root / "models/export"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.ts"]

    side = json.loads((folder / "model.json").read_text())
    assert side["classes"] == ["blue", "red"] and side["input_size"] == 224 and side["resize_size"] == 256
    assert side["mean"] == [0.5, 0.5, 0.5] and side["std"] == [0.5, 0.5, 0.5]
    assert side["input"]["name"] == "image" and side["output"]["name"] == "probabilities"

    checkpoint = torch.load(root / "models/model.pt", weights_only=True)
    prep = Preprocessing(side["input_size"], side["resize_size"], tuple(side["mean"]), tuple(side["std"]),
                         side["interpolation"])
    images = real_photos(prep)
    assert len(images) == 8
    with torch.inference_mode():
        expected = export.probability_model(checkpoint)(images).numpy()

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = session.run(["probabilities"], {"image": images.numpy()})[0]
    np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(session.run(None, {"image": images[:3].numpy()})[0], expected[:3], atol=1e-4, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(folder / "model.ts"))
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(images).numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-5)
