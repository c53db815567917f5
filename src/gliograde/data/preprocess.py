"""One BraTS case -> one (4, S, S, S) float16 volume, the same way for training and for prediction.

    load (nibabel) -> closest canonical (RAS) orientation -> brain mask (nonzero in any modality)
    -> crop to the mask's bounding box + margin -> pad to a cube -> resize to S^3
    -> z-score each modality over the brain voxels of this volume alone -> background exactly 0 -> float16

Only per-volume statistics are used, so nothing leaks between folds. `Geometry` records the crop and the
orientation so that a map on the S^3 grid (a saliency volume) can be taken back to the case's own voxel grid.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from gliograde.data.brats import Case
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


def resize_cube(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, L, L, L) -> (C, size, size, size): area averaging when shrinking (no aliasing), trilinear when growing."""
    if x.shape[-1] == size:
        return x
    mode = "area" if x.shape[-1] > size else "trilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x[None], size=(size, size, size), mode=mode, **kwargs)[0]


def load_case(case: Case) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The four modalities stacked as (4, X, Y, Z) float32 in canonical orientation, checked to share a grid."""
    volumes, ref = [], None
    for modality, path in zip(("t1", "t1ce", "t2", "flair"), case.files, strict=True):
        data, img = load_volume(path)
        if ref is None:
            ref, ref_path = img, path
        elif img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise DataError(
                f"case {case.id}: {Path(path).name} ({modality}) has shape {img.shape} and affine "
                f"{np.round(img.affine, 3).tolist()}, but {Path(ref_path).name} has shape {ref.shape} and affine "
                f"{np.round(ref.affine, 3).tolist()}; the four modalities must share one voxel grid"
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

    with torch.no_grad():
        x = torch.from_numpy(padded)
        resized = resize_cube(x, size)
        mask = resize_cube((x != 0).any(0, keepdim=True).float(), size)[0] > 0.5
        out = torch.zeros_like(resized)
        for c in range(resized.shape[0]):
            voxels = resized[c][mask].double()
            std = float(voxels.std())
            if not np.isfinite(std) or std < 1e-6:
                raise DataError(f"{case.files[c]}: constant intensity inside the brain; cannot be standardized")
            out[c][mask] = ((voxels - voxels.mean()) / std).float()
    geometry = Geometry(
        original_shape=[int(s) for s in ref.shape[:3]],
        original_affine=np.asarray(ref.affine, float).tolist(),
        crop_lo=lo,
        crop_hi=hi,
        cube=cube,
        pad_lo=pad_lo,
    )
    return out.numpy().astype(np.float16), geometry


def to_original_grid(volume: np.ndarray, geometry: Geometry | dict) -> nib.Nifti1Image:
    """Undo `preprocess_case` for a (S, S, S) map: resize to the cube, un-pad, un-crop, original orientation.

    Returns a NIfTI image on the original voxel grid (shape and affine of the source files), e.g. to overlay a
    saliency map on the FLAIR in ITK-SNAP or 3D Slicer.
    """
    g = geometry if isinstance(geometry, Geometry) else Geometry(**geometry)
    affine = np.asarray(g.original_affine, float)
    ornt = nib.orientations.io_orientation(affine)
    canonical_shape = nib.orientations.apply_orientation(np.empty(g.original_shape, np.uint8), ornt).shape
    with torch.no_grad():
        cube = resize_cube(torch.as_tensor(np.asarray(volume, np.float32))[None], g.cube)[0].numpy()
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
