"""models/model.safetensors: the one reader and writer of a trained model's checkpoint.

A checkpoint is self-describing: it rebuilds and preprocesses without params.yaml. It is a
safetensors file (the state dict's tensors, and every other field as JSON in its header), so
reading one runs no code, and numpy alone reads it: evaluating or exporting a model whose
backbone is the pretrained one needs the head's arrays only, and no torch (lib/head.py).
`version` changes whenever a field changes meaning, and an older file is refused with a line
saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from textwrap import shorten

from stages.lib.cli import UserError
from stages.lib.files import read_tensors, save_tensors_atomic
from stages.lib.head import Layers, head_layers
from stages.lib.paths import MODEL
from stages.lib.preprocessing import Preprocessing

VERSION = 4  # 3: temperature; 4: a safetensors file


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
    state_dict: dict  # torch tensors, or numpy arrays as read from a file
    # Fitted on the val split after training (lib/calibration.py): probabilities are
    # softmax(log p / temperature), which leaves the predicted class as it was.
    temperature: float = 1.0
    version: int = VERSION

    def uses_pretrained_backbone(self, sha256: str | None) -> bool:
        """The one check that this model's backbone is, tensor for tensor, the pretrained file with `sha256`."""
        return sha256 is not None and self.pretrained_backbone_sha256 == sha256

    def classifier(self):
        """The model in PyTorch (classifier.Classifier), in eval mode."""
        # Imported here: the checkpoint's other readers (evaluate and export of a model on the
        # cached features) run without torch.
        import torch

        from stages.lib.classifier import build_classifier

        model = build_classifier(self.backbone, len(self.classes), self.head)
        model.load_state_dict({name: torch.as_tensor(value) for name, value in self.state_dict.items()})
        return model.eval()

    def head_layers(self) -> Layers:
        """The head alone, as arrays, for scoring cached features without building the backbone."""
        return head_layers(self.state_dict, prefix="head.")

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "preprocessing": self.preprocessing.to_dict()}


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    data = checkpoint.to_dict()
    save_tensors_atomic(path, data.pop("state_dict"), data)


def checkpoint_from_dict(data: dict, source: Path) -> Checkpoint:
    if not isinstance(data, dict) or "classes" not in data or "state_dict" not in data:
        raise UserError(f"{source}: not a model checkpoint; give the "
                        f"{MODEL} the train stage writes")
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
    with path.open("rb") as file:
        if file.read(4) == b"PK\x03\x04":  # torch.save's zip: the pretrained weights, or an older model.pt
            raise UserError(f"{path}: a PyTorch file, not a model checkpoint; give the {MODEL} the train stage "
                            "writes, or retrain it (dvc repro)")
    try:
        tensors, meta = read_tensors(path)
    except Exception as err:  # noqa: BLE001 - truncated, a PyTorch file, not safetensors: all mean the same here
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable model checkpoint ({shorten(reason, 120, placeholder=' ...')}); "
                        f"give the {MODEL} the train stage writes, or retrain it (dvc repro)") from None
    return checkpoint_from_dict({**meta, "state_dict": tensors}, path)

