"""Cost of a network per volume: parameters, forward and forward+backward FLOPs, activation memory.

Measured on the meta device (shapes only, no arithmetic), so a ResNet50-3D at 128^3 costs nothing to profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from gliograde.networks.resnet3d import ResNet3D


@dataclass
class Profile:
    params: int
    gflop_forward: float  # per volume
    gflop_train: float  # forward + backward, per volume
    activation_bytes: int  # tensors saved for backward, per volume, at the given dtype
    feature_map: tuple[int, ...]  # (C, D, H, W) of layer4's output


def profile_model(model: ResNet3D, in_channels: int, size: int, dtype=torch.float32) -> Profile:
    params = sum(p.numel() for p in model.parameters())
    meta = ResNet3D(model.depth, in_channels, model.num_classes, model.shortcut, model.layout).to("meta", dtype)
    batch = 2  # BatchNorm in training mode needs more than one value per channel, even at 1^3 feature maps
    x = torch.empty(batch, in_channels, size, size, size, device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as fwd:
        features = meta.feature_maps(x)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    meta.train()
    with FlopCounterMode(display=False) as train, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(x.requires_grad_(False)).sum().backward()
    return Profile(
        params,
        fwd.get_total_flops() / 1e9 / batch,
        train.get_total_flops() / 1e9 / batch,
        sum(saved) // batch,
        tuple(features.shape[1:]),
    )
