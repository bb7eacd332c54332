"""Stage `export`: the ONNX model agrees with PyTorch on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from stages import export, export_backbone
from stages.lib.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from stages.lib.classifier import make_head
from stages.lib.data import eval_transform
from stages.lib.export import head_graph
from stages.lib.head import head_layers
from stages.lib.images import load_image
from stages.lib.preprocessing import Preprocessing
from tests.conftest import train_with_library

FIXTURES = Path(__file__).parent / "fixtures"


def real_photos(prep: Preprocessing) -> torch.Tensor:
    transform = eval_transform(prep)
    return torch.stack([transform(load_image(path, prep.resize_size)) for path in sorted(FIXTURES.glob("*.jpg"))])


def pytorch_probabilities(checkpoint: Checkpoint, images: torch.Tensor) -> np.ndarray:
    """What the exported model computes, in PyTorch: the softmax of the class scores / temperature."""
    with torch.inference_mode():
        return (checkpoint.classifier()(images) / checkpoint.temperature).softmax(1).numpy()


def check_exports_match_pytorch(root: Path, images: torch.Tensor | None = None) -> None:
    """model.onnx in models/export gives the checkpoint's probabilities (PyTorch) within 1e-4."""
    folder = root / "models/export"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx"]
    side = json.loads((folder / "model.json").read_text())
    prep = Preprocessing(side["input_size"], side["resize_size"], tuple(side["mean"]), tuple(side["std"]),
                         side["interpolation"])
    images = real_photos(prep) if images is None else images
    expected = pytorch_probabilities(read_checkpoint(root / "models/model.safetensors"), images)
    np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-5)

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    from_onnx = session.run(["probabilities"], {"image": images.numpy()})[0]
    np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(session.run(None, {"image": images[:3].numpy()})[0], expected[:3], atol=1e-4, rtol=0)


@pytest.mark.slow  # builds the real pretrained EfficientNet-Lite0
def test_onnx_matches_pytorch_on_real_photos(tiny_project, caplog):
    # The real EfficientNet-Lite0 (TF-style "same" padding included), with a head trained briefly;
    # frozen, so the export joins the export_backbone stage's backbone with the head.
    root = tiny_project(strategy="frozen", model={"backbone": "efficientnet_lite0", "weights": "pretrained"},
                        train={"head_epochs": 2})
    train_with_library(root)
    export_backbone.main()
    assert sorted(p.name for p in (root / "models/backbone_export").iterdir()) == [
        "backbone.json", "backbone.onnx"]
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" in caplog.text

    side = json.loads((root / "models/export/model.json").read_text())
    assert side["classes"] == ["blue", "red"] and side["input_size"] == 224 and side["resize_size"] == 256
    assert side["mean"] == [0.5, 0.5, 0.5] and side["std"] == [0.5, 0.5, 0.5]
    assert side["input"]["name"] == "image" and side["output"]["name"] == "probabilities" and side["tta"] == "none"
    check_exports_match_pytorch(root)


def test_a_trained_backbone_is_exported_whole(tiny_project, caplog):
    # finetune changes the backbone: the pretrained backbone's export must not be reused.
    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 1, "freeze_bn": False})
    train_with_library(root)
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert checkpoint.metrics["phase"] == "network" and checkpoint.pretrained_backbone_sha256 is None
    export_backbone.main()
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" not in caplog.text
    size = json.loads((root / "models/export/model.json").read_text())["input_size"]
    check_exports_match_pytorch(root, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))


def test_a_stale_backbone_export_is_not_reused(trained_copy, caplog):
    # A backbone export made from other weights (its pretrained file's hash differs) is ignored.
    root = trained_copy
    export_backbone.main()
    made_from = root / "models/backbone_export/backbone.json"
    made_from.write_text(json.dumps({**json.loads(made_from.read_text()), "pretrained_sha256": "0" * 64}))
    # A temperature other than 1, so that the comparison below shows the export applies it
    model = root / "models/model.safetensors"
    save_checkpoint(model, replace(read_checkpoint(model), temperature=0.6))
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" not in caplog.text
    assert json.loads((root / "models/export/model.json").read_text())["temperature"] == 0.6
    size = json.loads((root / "models/export/model.json").read_text())["input_size"]
    check_exports_match_pytorch(root, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow  # four stage processes
def test_the_export_is_the_same_bytes_whatever_the_hash_seed(trained_copy):
    # Python salts string hashes per process; nothing in the export may depend on set order.
    root = trained_copy
    exported = []
    for seed in ("1", "2"):
        for stage in ("export_backbone", "export"):
            done = subprocess.run([sys.executable, "-m", "stages", stage], cwd=root, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONHASHSEED=seed))
            assert done.returncode == 0, done.stderr
        exported.append({p.name: p.read_bytes() for p in sorted((root / "models/export").iterdir())})
    assert exported[0] == exported[1] and set(exported[0]) == {"model.json", "model.onnx"}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_head_graph_computes_what_pytorch_does(kind):
    # The export's head part is written from the head's arrays, without torch.
    torch.manual_seed(0)
    head = make_head(32, 3, kind=kind, hidden=16, dropout=0.3).eval()
    graph = head_graph(head_layers(head.state_dict()), temperature=0.7)
    onnx.checker.check_model(graph, full_check=True)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    features = torch.randn(5, 32) * 3
    with torch.inference_mode():
        expected = (head(features) / 0.7).softmax(1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"features": features.numpy()})[0], expected, atol=1e-6)


def imported_modules(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its log."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.slow  # two stage processes
def test_a_model_on_the_pretrained_backbone_is_evaluated_and_exported_without_torch(trained_copy):
    # What keeps a head-only experiment cheap: of its stages only train starts torch.
    root = trained_copy
    export_backbone.main()
    for stage in ("evaluate", "export"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages", stage], cwd=root,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = imported_modules(done.stderr)
        assert "stages.lib.checkpoint" in imported and "torch" not in imported, stage
    assert (root / "metrics/eval.json").is_file()
    check_exports_match_pytorch(root)
