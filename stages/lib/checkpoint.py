"""models/model.pt: the one reader and writer of a trained model's checkpoint.

A checkpoint is self-describing: it rebuilds and preprocesses without params.yaml. It is saved
as plain tensors and builtins, so `torch.load(weights_only=True)` reads it safely; `version`
changes whenever a field changes meaning, and an older file is refused with a line saying so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from textwrap import shorten

import torch
from torch import nn

from stages.lib.backbones import Preprocessing
from stages.lib.classifier import Classifier, build_classifier, make_head, unprefixed
from stages.lib.cli import UserError
from stages.lib.files import save_torch_atomic

VERSION = 3  # 3: temperature


@dataclass(frozen=True)
class Checkpoint:
    backbone: str  # the backbone's name in params (efficientnet_lite2, torchvision:resnet18, ...)
    weights: str  # model.weights it started from
    strategy: str
    classes: list[str]  # output order
    preprocessing: Preprocessing
    head: dict  # make_head's keyword arguments
    tta: str  # how the model scores images: the val epochs picked it that way
    epoch: int  # the best epoch, counted across phases from 1
    metrics: dict  # that epoch's EpochResult
    # sha256 of models/pretrained.pt when the backbone's tensors are exactly that file's (frozen,
    # or a finetune run whose best epoch was a head epoch), else None: cached features and the
    # backbone's export made from that file apply to this model only then.
    pretrained_backbone_sha256: str | None
    params: dict  # every param of the run, for the record
    state_dict: dict
    # Fitted on the val split after training (lib/calibration.py): probabilities are
    # softmax(log p / temperature), which leaves the predicted class as it was.
    temperature: float = 1.0
    version: int = VERSION

    def uses_pretrained_backbone(self, sha256: str | None) -> bool:
        """The one check that this model's backbone is, tensor for tensor, the pretrained file with `sha256`."""
        return sha256 is not None and self.pretrained_backbone_sha256 == sha256

    def classifier(self) -> Classifier:
        model = build_classifier(self.backbone, len(self.classes), self.head)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def head_module(self) -> nn.Module:
        """The head alone, for scoring cached features without building the backbone."""
        state = unprefixed("head", self.state_dict)
        width = next(v for v in state.values() if v.ndim == 2).shape[1]  # the first Linear's input
        head = make_head(width, len(self.classes), **self.head)
        head.load_state_dict(state)
        return head.eval()

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "preprocessing": self.preprocessing.to_dict()}


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    save_torch_atomic(path, checkpoint.to_dict())


def checkpoint_from_dict(data: dict, source: Path) -> Checkpoint:
    if not isinstance(data, dict) or "classes" not in data or "state_dict" not in data:
        what = "the weights stage's pretrained weights" if isinstance(data, dict) and "preprocessing" in data else \
            "a PyTorch file of another kind"
        raise UserError(f"{source}: not a model checkpoint ({what}); give the models/model.pt the train stage writes")
    if data.get("version") != VERSION:
        raise UserError(f"{source}: a checkpoint of format {data.get('version', 1)}, this code reads format {VERSION}; "
                        "retrain it (dvc repro)")
    try:
        return Checkpoint(**{**data, "preprocessing": Preprocessing.from_dict(data["preprocessing"])})
    except TypeError as err:
        raise UserError(f"{source}: a damaged model checkpoint ({err}); retrain it (dvc repro)") from None


def read_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise UserError(f"{path}: not found; run the train stage first (dvc repro)")
    try:
        # A TorchScript or other file makes torch warn before it fails: the one-line error says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, not torch: all mean the same here
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable model checkpoint ({shorten(reason, 120, placeholder=' ...')}); "
                        "give the models/model.pt the train stage writes, or retrain it (dvc repro)") from None
    return checkpoint_from_dict(data, path)

