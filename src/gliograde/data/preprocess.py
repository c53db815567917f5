"""One BraTS case -> one (4, S, S, S) float16 volume, the same way for training and for prediction.

    load (nibabel) -> closest canonical (RAS) orientation -> brain mask (nonzero in any modality)
    -> crop to the mask's bounding box + margin -> pad to a cube -> resize to S^3
    -> z-score each modality over the brain voxels of this volume alone -> background exactly 0 -> float16

Only per-volume statistics are used, so nothing leaks between folds. `Geometry` records the crop and the
orientation so that a map on the S^3 grid (a saliency volume) can be taken back to the case's own voxel grid.

numpy and nibabel only, no torch: the ONNX predictor prepares new cases with this module in a deployment without
torch. `resize_cube` computes what `torch.nn.functional.interpolate` computed here before (mode "area" when
shrinking, "trilinear" with align_corners=False when growing), in float32 and in torch's order of operations, so
caches made before and after are the same (tests/test_preprocess.py checks it against torch on real cases).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from gliograde.data.brats import Case, grid_difference
from gliograde.errors import DataError

PREPROCESS_VERSION = 1  # bump whenever the output of `preprocess_case` changes: caches are then rebuilt
DEFAULT_MARGIN = 4


@dataclass
class Geometry:
    """Where the S^3 volume came from: enough to map it back onto the original voxel grid."""

    original_shape: list[int]
    original_affine: list[list[float]]
    crop_lo: list[int]  # bounding box in canonical (RAS) voxel space, half-open [lo, hi)
    crop_hi: list[int]
    cube: int  # side of the zero-padded cube that was resized to S^3
    pad_lo: list[int]  # offset of the crop inside the cube

    def to_dict(self) -> dict:
        return asdict(self)


def load_volume(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A 3D image as float32 in closest-canonical orientation; every fault is a DataError naming the file."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:  # a 3D volume stored with a singleton time axis
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise DataError(f"{path}: a {len(shape)}D image of shape {tuple(shape)}; a 3D volume is expected")
    try:
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e})") from e
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: {bad} NaN or Inf voxels")
    if not data.any():
        raise DataError(f"{path}: every voxel is zero (an empty or failed export?)")
    return data, img


def load_segmentation(path: Path) -> np.ndarray:
    """A BraTS label map (int16 or uint8 on disk) as uint8 in canonical orientation; labels must be {0, 1, 2, 4}."""
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        labels = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 2, 4}:
        raise DataError(f"{path}: labels {sorted(values)} are not BraTS labels {{0, 1, 2, 4}}")
    return labels.astype(np.uint8)


def _area_windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output index's input window [start, start + length) under adaptive average pooling (torch's)."""
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    return start, ((i + 1) * n_in + n_out - 1) // n_out - start


def _area(x: np.ndarray, size: int, block: int = 8) -> np.ndarray:
    """(C, L, L, L) float32 -> (C, size, size, size), size < L: the mean over each output voxel's window, as
    torch's adaptive_avg_pool3d computes it (a float32 sum in (d, h, w) order, then / kD / kH / kW). A window
    shorter than the longest reads an appended zero plane: adding 0 leaves a float32 sum unchanged. One channel
    and `block` output planes at a time, so that the gathered windows stay in the CPU's caches."""
    c, n = x.shape[0], x.shape[-1]
    start, length = _area_windows(n, size)
    index = [np.where(d < length, start + d, n) for d in range(int(length.max()))]
    out = np.empty((c, size, size, size), np.float32)
    padded = np.zeros((n + 1, n + 1, n + 1), np.float32)
    for ch in range(c):
        padded[:n, :n, :n] = x[ch]
        by_w = [np.take(padded, i, axis=2) for i in index]  # (L+1, L+1, size) per offset along w
        for lo in range(0, size, block):
            total = np.zeros((min(block, size - lo), size, size), np.float32)
            for i_d in index:
                by_dw = [np.take(a, i_d[lo : lo + block], axis=0) for a in by_w]  # (block, L+1, size)
                for i_h in index:
                    for a in by_dw:
                        total += np.take(a, i_h, axis=1)
            out[ch, lo : lo + block] = total
    k = length.astype(np.float32)
    out /= k[:, None, None]
    out /= k[None, :, None]
    out /= k[None, None, :]
    return out


def _area_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """`_area(mask) > 0.5` for a (L, L, L) boolean mask, from exact integer counts (no float32 sums needed)."""
    n = mask.shape[-1]
    start, length = _area_windows(n, size)
    counts = mask.astype(np.int32)
    for axis in range(3):
        csum = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), np.cumsum(counts, axis=axis)], axis)
        counts = np.take(csum, start + length, axis=axis) - np.take(csum, start, axis=axis)
    k = length.astype(np.float32)
    mean = counts.astype(np.float32) / k[:, None, None] / k[None, :, None] / k[None, None, :]  # torch's divisions
    return mean > 0.5


def _linear_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation along one axis as torch's upsample kernel does it (align_corners=False): source
    index max(scale * (i + 0.5) - 0.5, 0) rounded once to float32, weights 1 - l and l in float32, and the value
    fma(x0, w0, x1 * w1) (computed in float64, which holds a float32 product exactly, then rounded once)."""
    n = x.shape[axis]
    scale = np.float64(np.float32(n) / np.float32(size))
    src = np.maximum(scale * (np.arange(size) + 0.5) - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    i1 = i0 + (i0 < n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    x0, x1 = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    far = (x1 * w1.reshape(shape)).astype(np.float64)
    return (x0.astype(np.float64) * w0.reshape(shape) + far).astype(np.float32)


def resize_cube(x: np.ndarray, size: int) -> np.ndarray:
    """(C, L, L, L) -> (C, size, size, size) float32: area averaging when shrinking (no aliasing), trilinear
    (align_corners=False) when growing; torch.nn.functional.interpolate's output in numpy."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return _area(x, size)
    for axis in (3, 2, 1):  # torch interpolates the last axis first
        x = _linear_axis(x, axis, size)
    return x


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(L, L, L) boolean -> (size, size, size) boolean: `resize_cube(mask) > 0.5`."""
    if mask.shape[-1] > size:
        return _area_mask(mask, size)
    return resize_cube(mask[None].astype(np.float32), size)[0] > 0.5


def load_case(case: Case) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The four modalities stacked as (4, X, Y, Z) float32 in canonical orientation, checked to share a grid."""
    volumes, ref = [], None
    for modality, path in zip(("t1", "t1ce", "t2", "flair"), case.files, strict=True):
        data, img = load_volume(path)
        if ref is None:
            ref, ref_path = img, path
        else:
            diff = grid_difference(img.shape, img.affine, ref.shape, ref.affine)
            if diff:
                raise DataError(  # named by its path like every image fault here: callers add the case's name
                    f"{path} ({modality}) and {Path(ref_path).name} are not on one voxel grid ({diff}); the four "
                    "modalities must share one voxel grid"
                )
        volumes.append(data)
    return np.stack(volumes), ref


def preprocess_case(case: Case, size: int = 128, margin: int = DEFAULT_MARGIN) -> tuple[np.ndarray, Geometry]:
    """The (4, size, size, size) float16 volume of a case and the geometry of how it was cut out."""
    stack, ref = load_case(case)
    brain = np.any(stack != 0, axis=0)
    nz = np.nonzero(brain)
    lo = [max(int(ax.min()) - margin, 0) for ax in nz]
    hi = [min(int(ax.max()) + 1 + margin, n) for ax, n in zip(nz, brain.shape, strict=True)]
    crop = stack[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    extent = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
    cube = max(extent)
    pad_lo = [(cube - e) // 2 for e in extent]
    padded = np.zeros((stack.shape[0], cube, cube, cube), np.float32)
    padded[
        :,
        pad_lo[0] : pad_lo[0] + extent[0],
        pad_lo[1] : pad_lo[1] + extent[1],
        pad_lo[2] : pad_lo[2] + extent[2],
    ] = crop

    resized = resize_cube(padded, size)
    mask = resize_mask((padded != 0).any(0), size)
    out = np.zeros_like(resized)
    for c in range(resized.shape[0]):
        voxels = resized[c][mask].astype(np.float64)
        std = float(voxels.std(ddof=1)) if voxels.size > 1 else float("nan")  # torch's std: the unbiased one
        if not np.isfinite(std) or std < 1e-6:
            raise DataError(f"{case.files[c]}: constant intensity inside the brain; cannot be standardized")
        out[c][mask] = ((voxels - voxels.mean()) / std).astype(np.float32)
    geometry = Geometry(
        original_shape=[int(s) for s in ref.shape[:3]],
        original_affine=np.asarray(ref.affine, float).tolist(),
        crop_lo=lo,
        crop_hi=hi,
        cube=cube,
        pad_lo=pad_lo,
    )
    return out.astype(np.float16), geometry


def to_original_grid(volume: np.ndarray, geometry: Geometry | dict) -> nib.Nifti1Image:
    """Undo `preprocess_case` for a (S, S, S) map: resize to the cube, un-pad, un-crop, original orientation.

    Returns a NIfTI image on the original voxel grid (shape and affine of the source files), e.g. to overlay a
    saliency map on the FLAIR in ITK-SNAP or 3D Slicer.
    """
    g = geometry if isinstance(geometry, Geometry) else Geometry(**geometry)
    affine = np.asarray(g.original_affine, float)
    ornt = nib.orientations.io_orientation(affine)
    canonical_shape = nib.orientations.apply_orientation(np.empty(g.original_shape, np.uint8), ornt).shape
    cube = resize_cube(np.asarray(volume, np.float32)[None], g.cube)[0]
    extent = [h - lo_ for lo_, h in zip(g.crop_lo, g.crop_hi, strict=True)]
    canonical = np.zeros(canonical_shape, np.float32)
    p = g.pad_lo
    canonical[g.crop_lo[0] : g.crop_hi[0], g.crop_lo[1] : g.crop_hi[1], g.crop_lo[2] : g.crop_hi[2]] = cube[
        p[0] : p[0] + extent[0], p[1] : p[1] + extent[1], p[2] : p[2] + extent[2]
    ]
    # canonical -> original axes: the inverse of the orientation transform that as_closest_canonical applied
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    data = nib.orientations.apply_orientation(canonical, back)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)
