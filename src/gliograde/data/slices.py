"""Entropy-based axial slice selection for the 2D multiple-instance (MIL) model.

Volumes are (C, D, H, W) (or (D, H, W), one channel) in canonical RAS, so axial slices are `volume[..., z]`
(the last axis). Brain voxels are the voxels that are non-zero in any channel (background is exactly 0).

Binning (identical in `slice_entropy` here and in the MIL model's on-device `networks.mil.torch_slice_entropy`): for
each channel, `bins` equal bins span that channel's brain-intensity range [min, max] over the whole volume (not per
slice), so the entropies of the slices of one volume are comparable. A brain voxel of value v goes to bin
`clip(floor((v - min) / (max - min) * bins), 0, bins - 1)`, computed in float32 (max itself falls in the last bin; a
constant channel puts everything in bin 0). The entropy of a slice is the Shannon entropy, in bits, of the histogram
of its brain voxels; a slice with fewer than 2 brain voxels has entropy 0. With `channel=None` the per-channel
entropies are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_channels(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().float().numpy()
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"expected a (C, D, H, W) or (D, H, W) volume, got shape {v.shape}")
    return v


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis of a histogram array; 0 where it holds fewer than 2 voxels."""
    n = counts.sum(-1, keepdims=True)
    p = counts / np.maximum(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0).sum(-1)
    return np.where(n[..., 0] >= 2, h, 0.0)


def brain_slice_counts(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """The number of brain voxels (non-zero in any channel) of each axial slice: (S,) int."""
    v = _as_channels(volume)
    return (v != 0).any(0).sum((0, 1))


def slice_entropy(volume: np.ndarray | torch.Tensor, channel: int | None = None, bins: int = 64) -> np.ndarray:
    """Per axial slice (last axis) entropy in bits of the brain-voxel intensity histogram: (S,) float64.

    See the module docstring for the binning. `channel` None averages the per-channel entropies.
    """
    if bins < 1:
        raise ValueError(f"bins {bins} must be at least 1")
    v = _as_channels(volume)
    n_ch, _, _, n_slices = v.shape
    channels = range(n_ch) if channel is None else [channel]
    if channel is not None and not -n_ch <= channel < n_ch:
        raise ValueError(f"channel {channel} is out of range for a volume with {n_ch} channels")
    mask = (v != 0).any(0)
    if not mask.any():
        return np.zeros(n_slices)
    slice_of = np.broadcast_to(np.arange(n_slices), mask.shape)[mask]
    out = np.zeros(n_slices)
    for c in channels:
        vals = v[c][mask]
        lo, hi = vals.min(), vals.max()
        rng = np.float32(hi - lo) if hi > lo else np.float32(1.0)
        idx = np.clip(np.floor((vals - lo) / rng * np.float32(bins)), 0, bins - 1).astype(np.int64)
        counts = np.bincount(slice_of * bins + idx, minlength=n_slices * bins).reshape(n_slices, bins)
        out += _entropy_bits(counts.astype(np.float64))
    return out / len(channels)


def select_slices(
    entropy: np.ndarray | Sequence[float],
    k: int = 16,
    min_gap: int = 0,
    brain: np.ndarray | Sequence[bool] | None = None,
) -> np.ndarray:
    """The k slices of highest entropy, sorted by index.

    Greedy, highest entropy first (ties: lower index first); with `min_gap` > 0 a slice is skipped when it lies
    within `min_gap` slices of one already chosen, i.e. chosen slices satisfy |i - j| > min_gap (at least
    `min_gap` unchosen slices between two chosen ones). Candidates are the slices with brain: `brain` (a boolean
    or count per slice, e.g. `brain_slice_counts`) when given, otherwise the slices of non-zero entropy.
    Raises ValueError when there is no candidate, when k exceeds the number of candidates, or when the gap
    leaves fewer than k.
    """
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 1:
        raise ValueError(f"entropy must be one-dimensional (S,), got shape {h.shape}")
    if k < 1:
        raise ValueError(f"k {k} must be at least 1")
    if min_gap < 0:
        raise ValueError(f"min_gap {min_gap} must be >= 0")
    has_brain = h > 0 if brain is None else np.asarray(brain).astype(bool)
    if has_brain.shape != h.shape:
        raise ValueError(f"brain has shape {has_brain.shape}, entropy {h.shape}")
    n_brain = int(has_brain.sum())
    if n_brain == 0:
        raise ValueError("the volume has no brain voxels (no slice to select)")
    if k > n_brain:
        raise ValueError(f"k={k} slices requested but only {n_brain} slices contain brain")
    candidates = np.flatnonzero(has_brain)
    order = candidates[np.argsort(-h[candidates], kind="stable")]
    if min_gap == 0:
        return np.sort(order[:k])
    chosen: list[int] = []
    for i in order:
        if all(abs(int(i) - j) > min_gap for j in chosen):
            chosen.append(int(i))
            if len(chosen) == k:
                return np.array(sorted(chosen), dtype=np.int64)
    raise ValueError(
        f"k={k} slices with min_gap={min_gap} do not fit: only {len(chosen)} of the {n_brain} brain slices qualify"
    )


def select_volume_slices(
    volume: np.ndarray | torch.Tensor, k: int = 16, min_gap: int = 0, channel: int | None = None, bins: int = 64
) -> np.ndarray:
    """`select_slices` on one volume, with the slices that contain brain as candidates."""
    counts = brain_slice_counts(volume)
    return select_slices(slice_entropy(volume, channel, bins), k, min_gap, brain=counts > 0)


def check_bag_sizes(cache, rows, channels: list[int], k: int, log) -> None:
    """Before a MIL run: a case with no brain voxels is an error naming it; a case with fewer axial brain slices
    than k is warned about (its bag is filled with the next slices without brain: a clamp, said here once)."""
    short, names = [], cache.ids
    for r in rows:
        counts = brain_slice_counts(np.asarray(cache.volumes[r][channels]))
        n = int((counts > 1).sum())
        if n == 0:
            raise ValueError(f"case {names[r]} has no brain voxels in the cache; it cannot make a bag of slices")
        if n < k:
            short.append(f"{names[r]} ({n})")
    if short:
        log.warning(
            "--mil-k %d: %d case(s) have fewer axial brain slices than that, and their bags are filled with slices "
            "without brain: %s%s",
            k,
            len(short),
            ", ".join(short[:5]),
            " ..." if len(short) > 5 else "",
        )
