"""Batched augmentation on whatever device the batch lives on, identical for all channels of a volume.

One `affine_grid` + `grid_sample` per batch does the per-axis flips, a small rotation about each axis and an
isotropic scaling; then a per-channel intensity scale and shift inside the brain. Random numbers are drawn on the
CPU from an explicit generator, so a run is reproducible (and resumable) whatever the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale_range: float = 0.1  # zoom factor drawn from [1 - r, 1 + r]
    intensity_scale: float = 0.1  # per channel, multiply by [1 - r, 1 + r]
    intensity_shift: float = 0.1  # per channel, add [-r, r] (in z-score units)

    @classmethod
    def from_config(cls, cfg) -> AugmentParams | None:
        """The augmentation a configuration asks for, read field by field (a parameter added here is read from the
        configuration key of the same name; one it lacks keeps this default); None where `cfg.augment` is off."""
        if not getattr(cfg, "augment", True):
            return None
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians -> (B, 3, 3) rotation Rz @ Ry @ Rx."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def affine_grid(theta: torch.Tensor, size) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, *size), align_corners=False) as a broadcast sum of the three coordinate axes:
    no materialized base grid and no bmm, about 5x faster on the CPU, equal to it within 1e-6."""
    d, h, w = size

    def axis(n: int) -> torch.Tensor:  # voxel centres in [-1, 1]
        return (torch.arange(n, dtype=theta.dtype, device=theta.device) * 2 + 1) / n - 1

    t = theta[:, None, None, None]  # (B, 1, 1, 1, 3, 4): x (width), y (height), z (depth) columns, then shift
    return (
        t[..., 0] * axis(w)[:, None]
        + t[..., 3]
        + t[..., 1] * axis(h)[:, None, None]
        + t[..., 2] * axis(d)[:, None, None, None]
    )


def draw_params(batch: int, channels: int, p: AugmentParams, generator: torch.Generator | None = None) -> dict:
    """The random numbers of one batch (on the CPU): flips (B, 3), angles (B, 3), zoom (B,), scale/shift (B, C)."""

    def uniform(*shape, low=-1.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    return {
        "flips": torch.rand(batch, 3, generator=generator) < p.flip_prob,
        "angles": uniform(batch, 3) * math.radians(p.rotate_deg),
        "zoom": 1 + uniform(batch) * p.scale_range,
        "scale": 1 + uniform(batch, channels) * p.intensity_scale,
        "shift": uniform(batch, channels) * p.intensity_shift,
    }


def augment_batch(x: torch.Tensor, p: AugmentParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a (B, C, D, H, W) batch; background (exact zeros) stays zero."""
    return apply_params(x, draw_params(x.shape[0], x.shape[1], p, generator))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without blocking the host: a copy from pageable memory makes the host wait for
    the copy, so for CUDA it goes through pinned memory with non_blocking. On the CPU, `t` itself."""
    if device.type == "cuda" and t.device.type == "cpu" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def apply_params(x: torch.Tensor, r: dict) -> torch.Tensor:
    """The augmentation of drawn parameters `r` (draw_params), on x's device, in one grid_sample."""
    b, c = x.shape[:2]
    signs = 1 - 2 * r["flips"].float()
    # theta maps output coordinates to input coordinates: flip, rotate, then divide by zoom
    a = _rotation(r["angles"]) * signs[:, None, :] / r["zoom"][:, None, None]
    theta = torch.cat([a, torch.zeros(b, 3, 1)], dim=2)
    # theta, scale and shift in one host tensor: one (pinned, asynchronous) copy per batch instead of three
    packed = to_device(torch.cat([theta.reshape(b, 12), r["scale"], r["shift"]], dim=1).float(), x.device)
    theta = packed[:, :12].view(b, 3, 4)
    scale, shift = packed[:, 12 : 12 + c], packed[:, 12 + c :]
    xf = x.float()
    grid = affine_grid(theta, xf.shape[2:])
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    background = (out == 0).all(dim=1, keepdim=True)
    # in place on the resampled copy: about 13 % faster on the CPU than a where() over fresh tensors, same values
    out.mul_(scale[:, :, None, None, None]).add_(shift[:, :, None, None, None])
    return out.masked_fill_(background, 0).to(x.dtype)
