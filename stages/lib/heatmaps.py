"""Where a model looks: a heat map per image of the evidence for a class.

Grad-CAM (Selvaraju et al., ICCV 2017): the backbone's last spatial feature map, each channel
weighted by the mean gradient of the class's score over it, summed, negatives dropped. The map is
as coarse as that last map (an EfficientNet-Lite's is 1/32 of the input: 9x9 at 260 px) and is
upsampled to the input. The score is the class's logit; the model's temperature divides every
logit alike, which leaves a map normalised to its maximum unchanged.

A backbone without a spatial last map (vision transformers, whose last blocks hold tokens; timm's
Swin and other channels-last models) gets a saliency map instead (Simonyan et al., 2014): the
largest absolute gradient of the class's score over the input's channels at each pixel, smoothed.
It is noisier than Grad-CAM but needs nothing of the architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRAD_CAM = "Grad-CAM"
SALIENCY = "input-gradient saliency"


def last_feature_map(backbone: nn.Module, input_size: int) -> str | None:
    """The name of the module whose output is the backbone's last spatial map (N, C, H, W), or
    None when it has none.

    Found by running the backbone once and watching every module finish: the last output that
    still has a spatial or token axis must be a square (the input is) channels-first map larger
    than 1x1. A container finishes after its children, so the name is the outermost module that
    produces the map (ResNet's layer4, not its last ReLU; timm's bn2, whose activation is inside).
    """
    finished: list[tuple[str, tuple[int, ...]]] = []

    def record(name):
        return lambda module, inputs, output: finished.append(
            (name, tuple(output.shape))) if isinstance(output, torch.Tensor) else None

    handles = [module.register_forward_hook(record(name)) for name, module in backbone.named_modules() if name]
    try:
        was_training = backbone.training
        backbone.eval()
        parameter = next(backbone.parameters())
        with torch.no_grad():
            backbone(torch.zeros(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype))
        backbone.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    unpooled = [(name, shape) for name, shape in finished if len(shape) >= 3 and max(shape[2:]) > 1]
    if not unpooled:
        return None
    name, shape = unpooled[-1]
    return name if len(shape) == 4 and shape[2] == shape[3] > 1 else None


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to 0..1 by its own maximum (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps / peak[:, None, None]


def grad_cam(model: nn.Module, layer: str, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) at the images' size, 0..1, for `classes` (one per image)."""
    captured = {}
    handle = model.backbone.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("map", output))
    try:
        with torch.enable_grad():
            logits = model(images)
            score = logits.float().gather(1, classes[:, None]).sum()
            gradient, = torch.autograd.grad(score, captured["map"])
    finally:
        handle.remove()
    feature_map = captured["map"].detach().float()
    weights = gradient.float().mean((2, 3), keepdim=True)
    maps = F.relu((weights * feature_map).sum(1, keepdim=True))
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return normalised(maps[:, 0])


def saliency(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Input-gradient saliency maps (N, H, W), 0..1, smoothed over 1/28 of the image."""
    images = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(images).float().gather(1, classes[:, None]).sum()
        gradient, = torch.autograd.grad(score, images)
    maps = gradient.float().abs().amax(1, keepdim=True)
    kernel = max(3, images.shape[-1] // 28) | 1
    maps = F.avg_pool2d(maps, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return normalised(maps[:, 0])


def class_heatmaps(model: nn.Module, layer: str | None, images: torch.Tensor, classes: torch.Tensor,
                   tta: str) -> torch.Tensor:
    """The maps of the model as it scores images: with tta=hflip it averages an image with its
    mirror, so the map is the average of the image's map and the mirror's map mirrored back."""
    def maps_of(batch):
        return grad_cam(model, layer, batch, classes) if layer else saliency(model, batch, classes)

    maps = maps_of(images)
    if tta == "hflip":
        maps = normalised((maps + maps_of(images.flip(-1)).flip(-1)) / 2)
    return maps.cpu()
