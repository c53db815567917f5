"""Saliency maps: Grad-CAM on a residual stage of the ResNet-3D, or on the last feature map of any network of the
architecture table (Selvaraju et al., 2017): the gradient of the HGG logit with respect to the map weights its
channels; attention rollout for a ViT, which has tokens and no map (`attention_rollout`, networks/monai_nets.py);
none for a network with neither, said. Used by `predict --saliency` (inference/saliency.py draws it) and by the
tumour-mask attention audit of `evaluate --attention` (evaluation/attention.py).

Grad-CAM through `feature_maps` relies on the contract of networks/classifier.py: the pooled features are the mean
of that map over its spatial axes, so the head applied to that mean is the network's own logit."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gliograde.networks.resnet3d import ResNet3D

MIN_EDGE = 4  # a map coarser than 4 voxels per edge cannot localize anything
LAST_MAP = "last feature map"  # the layer of Grad-CAM on a network other than the ResNet-3D
ROLLOUT = "attention rollout"


def saliency(
    model: nn.Module, x: torch.Tensor, target: int = 1, layer: str = "auto"
) -> tuple[torch.Tensor | None, str]:
    """(B, C, S, S, S) -> ((B, S, S, S) maps in [0, 1], zero outside the brain, or None; what made them: a ResNet
    stage or LAST_MAP (Grad-CAM of class `target`), ROLLOUT (class-agnostic), or why no map is made)."""
    if hasattr(model, "attention_rollout"):
        model.eval()
        return _finish(model.attention_rollout(x)[:, None].float(), x), ROLLOUT
    return grad_cam(model, x, target, layer)


def saliency_grid(model: nn.Module, size: int) -> tuple[int, ...] | None:
    """The native grid of a network's map (not the ResNet-3D's: its stages' grids are attention.cam_grid's) for a
    size^3 input, before it is upsampled; None where it makes none."""
    p = next(model.parameters())
    x = torch.zeros(1, getattr(model, "in_channels", 1), size, size, size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if hasattr(model, "attention_rollout"):
            grid = tuple(model.attention_rollout(x).shape[1:])
        else:
            maps = model.feature_maps(x) if hasattr(model, "feature_maps") else None
            grid = None if maps is None else tuple(maps.shape[2:])
    model.train(was_training)
    return grid


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: int = 1, layer: str = "auto"
) -> tuple[torch.Tensor | None, str]:
    """(B, C, S, S, S) -> ((B, S, S, S) maps in [0, 1] for class `target`, zero outside the brain; the layer used).

    ResNet-3D: layer1..layer4, or auto = the deepest stage whose map has at least MIN_EDGE voxels per edge (layer4
    for 128^3 inputs; an earlier stage for small demo volumes, where layer4 is a single voxel). Another network: its
    last feature map whatever `layer` says (LAST_MAP), or (None, why) where `feature_maps` gives none."""
    model.eval()
    if not isinstance(model, ResNet3D):
        return _last_map_cam(model, x, target)
    names = ("layer1", "layer2", "layer3", "layer4")
    if layer != "auto" and layer not in names:
        raise ValueError(f"layer {layer!r} is not auto or one of {names}")
    with torch.enable_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        outputs = {}
        for name in names:
            h = getattr(model, name)(h)
            outputs[name] = h
        if layer == "auto":
            fine = [n for n in names if min(outputs[n].shape[2:]) >= MIN_EDGE]
            layer = fine[-1] if fine else "layer1"
        features = outputs[layer]
        logits = model.forward_head(torch.flatten(model.avgpool(h), 1))
        (grad,) = torch.autograd.grad(logits[:, target].sum(), features)
    return _finish(_weighted(grad, features), x), layer


def _last_map_cam(model: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor | None, str]:
    what = model.describe() if hasattr(model, "describe") else type(model).__name__
    if not hasattr(model, "feature_maps"):
        return None, f"no saliency map: {what} has no feature map for Grad-CAM"
    with torch.enable_grad():
        features = model.feature_maps(x)
        if features is None:
            return None, f"no saliency map: {what} has tokens, not a feature map, and no attention rollout"
        logits = model.forward_head(torch.flatten(features, 2).mean(2))
        (grad,) = torch.autograd.grad(logits[:, target].sum(), features)
    return _finish(_weighted(grad, features), x), LAST_MAP


def _weighted(grad: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Grad-CAM proper: the channels weighted by their mean gradient, summed, negative evidence cut (B, 1, ...)."""
    with torch.no_grad():
        weights = grad.float().mean(dim=(2, 3, 4), keepdim=True)
        return F.relu((weights * features.float()).sum(1, keepdim=True))


def _finish(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A native-grid map (B, 1, d, h, w) upsampled to the input, cut to the brain, scaled to peak 1 per case."""
    with torch.no_grad():
        cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
        cam = cam * (x != 0).any(1)  # background (exactly 0 after preprocessing) carries no evidence
        peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return cam / peak
