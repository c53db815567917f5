"""Grad-CAM on a residual stage of the ResNet-3D (Selvaraju et al., 2017): the gradient of the HGG logit with respect
to a stage's output weights its channels. Used by `predict --saliency` (inference/saliency.py draws it) and by the
tumour-mask attention audit of `evaluate --attention` (evaluation/attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gliograde.networks.resnet3d import ResNet3D

MIN_EDGE = 4  # a map coarser than 4 voxels per edge cannot localize anything


def grad_cam(model: ResNet3D, x: torch.Tensor, target: int = 1, layer: str = "auto") -> tuple[torch.Tensor, str]:
    """(B, C, S, S, S) -> ((B, S, S, S) maps in [0, 1] for class `target`, zero outside the brain; the layer used).

    layer: layer1..layer4, or auto = the deepest stage whose map has at least MIN_EDGE voxels per edge (layer4 for
    128^3 inputs; an earlier stage for small demo volumes, where layer4 is a single voxel)."""
    model.eval()
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
    with torch.no_grad():
        weights = grad.float().mean(dim=(2, 3, 4), keepdim=True)
        cam = F.relu((weights * features.float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
        cam = cam * (x != 0).any(1)  # background (exactly 0 after preprocessing) carries no evidence
        peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return cam / peak, layer
