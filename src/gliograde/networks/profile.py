"""Cost of a network per volume: parameters, forward and forward+backward FLOPs, activation memory.

Measured on the meta device (shapes only, no arithmetic), so a ResNet50-3D or a ViT-B at 128^3 costs nothing to
profile. A network whose constructor reads values (MONAI's Swin transformer: its drop-path rates) is built on the
CPU and moved to the meta device; one whose forward pass reads values is run for real on the CPU, and `measured_on`
says so. FLOPs are torch's FlopCounterMode's (convolutions, matrix products, attention), as GPU MFU figures count them,
with one correction: its formula counts the weight gradient of a grouped convolution as if it were not grouped, which
made an EfficientNet's backward pass 60 times its forward (its depthwise convolutions, groups = channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from gliograde.networks.registry import build_from_description
from gliograde.networks.resnet3d import ResNet3D


@dataclass
class Profile:
    params: int
    gflop_forward: float  # per volume
    gflop_train: float  # forward + backward, per volume
    activation_bytes: int  # tensors saved for backward, per volume, at the given dtype
    feature_map: tuple[int, ...] | None  # (C, D, H, W) of the last feature map (layer4's); None: tokens, no map
    measured_on: str = "meta"  # "meta": shapes only; "cpu": computed for real (a forward that reads values)


def profile_model(model: ResNet3D, in_channels: int, size: int, dtype=torch.float32) -> Profile:
    """A ResNet-3D's profile (bench and model-info's ResNet figures)."""
    desc = {"model": "resnet3d", "depth": model.depth, "layout": model.layout, "shortcut": model.shortcut,
            "in_channels": in_channels, "num_classes": model.num_classes, "dropout": 0.0}  # fmt: skip
    return profile_description(desc, size, dtype)


def profile_description(desc: dict, size: int, dtype=torch.float32) -> Profile:
    """The profile of the network a description names, at (in_channels, size^3), per volume. A description that
    records the input size (ViT, Swin, EfficientNet) is profiled at `size`."""
    desc = {**desc, "size": size} if "size" in desc else desc
    model = meta_model(desc).to(dtype=dtype)
    try:
        return _measure(model, desc["in_channels"], size, dtype, "meta")
    except (NotImplementedError, RuntimeError):  # a forward pass that reads values: run it for real
        return _measure(build_from_description(desc).to(dtype=dtype), desc["in_channels"], size, dtype, "cpu")


def meta_model(desc: dict) -> nn.Module:
    """The network a description names, on the meta device (no memory, no arithmetic)."""
    try:
        with torch.device("meta"):
            return build_from_description(desc)
    except (NotImplementedError, RuntimeError):  # a constructor that reads values (Tensor.item): built, then moved
        return build_from_description(desc).to("meta")


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    """torch's count for the input gradient, and its count for the weight gradient divided by the groups."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
    grad_weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    return grad_input + grad_weight // groups


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}


def _measure(model: nn.Module, in_channels: int, size: int, dtype, device: str) -> Profile:
    params = sum(p.numel() for p in model.parameters())
    # BatchNorm in training mode needs more than one value per channel, even at 1^3 feature maps
    batch = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    x = torch.zeros(batch, in_channels, size, size, size, device=device, dtype=dtype)
    model.eval()
    with torch.no_grad():
        maps = model.feature_maps(x) if hasattr(model, "feature_maps") else None
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fwd:
            model(x)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter as train, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return Profile(
        params,
        fwd.get_total_flops() / 1e9 / batch,
        train.get_total_flops() / 1e9 / batch,
        sum(saved) // batch,
        tuple(maps.shape[1:]) if maps is not None else None,
        device,
    )
