"""A trained head as arrays: class probabilities from cached features with numpy alone.

Every place that scores cached features goes through `feature_probabilities`: the head epochs'
val scores in train, the fitted temperature, and evaluate on a model whose backbone is the
pretrained one. It needs no torch, so evaluating a frozen model does not import it (2 s of a
head-only experiment); tests/test_models.py checks it against the head's PyTorch module.
"""

from __future__ import annotations

import numpy as np

from stages.lib.calibration import softmax
from stages.lib.cli import UserError

Layers = list[tuple[np.ndarray, np.ndarray]]  # the head's Linear layers in order: (weight, bias)


def as_array(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.detach().cpu().float().numpy()


def head_layers(state: dict, prefix: str = "") -> Layers:
    """The Linear layers of the head in a state dict, in order: its keys start with `prefix` (a
    classifier's: "head.") and go on as classifier.make_head names them (`1.weight`, `1.bias`, and
    for an mlp head `4.weight`, `4.bias`). A ReLU comes between two; dropout does nothing here."""
    own = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    indices = sorted(int(key.split(".")[0]) for key in own if key.endswith(".weight"))
    return [(as_array(own[f"{i}.weight"]), as_array(own[f"{i}.bias"])) for i in indices]


def head_logits(layers: Layers, features: np.ndarray) -> np.ndarray:
    scores = features
    for i, (weight, bias) in enumerate(layers):
        scores = (np.maximum(scores, 0) if i else scores) @ weight.T + bias
    return scores


CHUNK = 4096  # images scored at once: the memory of a chunk, whatever the split's size


def feature_probabilities(layers: Layers, split: dict, tta: str) -> np.ndarray:
    """Class probabilities from cached features (lib/features.py; an array or OnDisk), chunk by
    chunk: the plain view, averaged with the mirrored one for tta=hflip, as lib/inference.py does
    on images."""
    views, features = split["views"], split["features"]
    if tta == "hflip" and "hflip" not in views:
        raise UserError("cached features lack the mirrored view that model.tta=hflip needs; run dvc repro")
    chunks = []
    for start in range(0, len(features), CHUNK):
        rows = slice(start, start + CHUNK)
        probs = softmax(head_logits(layers, features[rows, views.index("plain")]))
        if tta == "hflip":
            probs = (probs + softmax(head_logits(layers, features[rows, views.index("hflip")]))) / 2
        chunks.append(probs)
    return np.concatenate(chunks) if chunks else np.zeros((0, len(layers[-1][1])), np.float32)
