"""Where does the model look? Grad-CAM mass inside the BraTS tumour mask, and the pointing game.

BraTS training cases ship a label map `<case>_seg.nii.gz` (1 necrosis / non-enhancing core, 2 oedema,
4 enhancing tumour). It is never a model input, but it lets evaluation check the model's evidence: for each case,

- mass_in_mask: the fraction of the Grad-CAM mass that falls inside the tumour (seg > 0);
- pointing_hit: whether the map's hottest voxel lies inside the tumour (the pointing game, Zhang et al., 2016);
- chance: the tumour's share of the brain, i.e. mass_in_mask of a map that is uniform over the brain.

A high AUC with mass_in_mask near chance is the signature of shortcut learning (site, scanner, brain size...).

The mask is brought to the cache grid exactly as `preprocess_case` brought the image there (canonical RAS
orientation -> crop box -> zero pad to a cube -> resize), from the per-case `Geometry` stored in the cache's
geometry.json, with nearest-neighbour resampling so that labels stay labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from gliograde import GRADES
from gliograde.data.brats import discover_cases
from gliograde.data.cache import GEOMETRY, VolumeCache
from gliograde.data.preprocess import Geometry, load_segmentation
from gliograde.errors import DataError, GliogradeError
from gliograde.networks.gradcam import saliency, saliency_grid
from gliograde.networks.resnet3d import ResNet3D

HGG = GRADES.index("HGG")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _geometry(geometry: Geometry | Mapping | None) -> Geometry:
    if geometry is None:
        raise GliogradeError(
            "no crop geometry for this case: the cache keeps no geometry.json entry for it, so the tumour mask "
            "cannot be placed on the cache grid (prepare the cache again with `gliograde prepare`)"
        )
    if isinstance(geometry, Geometry):
        return geometry
    fields = ("original_shape", "original_affine", "crop_lo", "crop_hi", "cube", "pad_lo")
    missing = [f for f in fields if f not in geometry]
    if missing:
        raise GliogradeError(
            f"the crop geometry lacks {', '.join(missing)}; the tumour mask cannot be placed on the cache grid "
            "(prepare the cache again with `gliograde prepare`)"
        )
    return Geometry(**{f: geometry[f] for f in fields})


def mask_on_cache_grid(seg_path: str | Path, geometry: Geometry | Mapping | None, size: int) -> np.ndarray:
    """The tumour mask (seg > 0) of a case as a bool (size, size, size) array on its cache grid.

    Repeats the forward mapping of `preprocess_case` (closest canonical orientation, crop to
    [crop_lo, crop_hi), zero pad into a cube at pad_lo, resize to size^3) with nearest-neighbour resampling
    ("nearest-exact": voxel centres, as the image's area / trilinear resizing uses). The label file must lie
    on the grid the geometry was recorded for (same shape and affine as the case's images)."""
    g = _geometry(geometry)
    seg_path = Path(seg_path)
    labels = load_segmentation(seg_path)  # canonical orientation, labels checked to be BraTS labels
    affine = np.asarray(g.original_affine, float)
    ornt = nib.orientations.io_orientation(affine)
    canonical_shape = nib.orientations.apply_orientation(np.empty(g.original_shape, np.uint8), ornt).shape
    seg_affine = nib.load(str(seg_path)).affine
    if labels.shape != tuple(canonical_shape) or not np.allclose(seg_affine, affine, atol=1e-3):
        raise DataError(
            f"{seg_path}: shape {tuple(nib.load(str(seg_path)).shape)} and affine {np.round(seg_affine, 3).tolist()} "
            f"differ from the case's image grid (shape {tuple(g.original_shape)}, affine "
            f"{np.round(affine, 3).tolist()}); the mask cannot be placed on the cache grid"
        )
    lo, hi, p = g.crop_lo, g.crop_hi, g.pad_lo
    extent = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
    cube = np.zeros((g.cube,) * 3, np.float32)
    cube[p[0] : p[0] + extent[0], p[1] : p[1] + extent[1], p[2] : p[2] + extent[2]] = (
        labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
    )
    if g.cube == size:
        return cube > 0.5
    with torch.no_grad():
        out = F.interpolate(torch.from_numpy(cube)[None, None], size=(size,) * 3, mode="nearest-exact")[0, 0]
    return out.numpy() > 0.5


def attention_scores(cam: np.ndarray, mask: np.ndarray, brain: np.ndarray | None = None) -> dict:
    """How much of a saliency map lies in a mask.

    cam: a (D, H, W) map, negative values clipped to 0, upsampled trilinearly to the mask's shape when coarser.
    mask: a bool array (the tumour on the same grid). brain: the image (C, D, H, W) or (D, H, W), or a brain mask;
    the brain is its non-zero voxels (any channel), or every voxel when not given.

    Returns mass_in_mask = sum(cam * mask) / sum(cam) (nan for an all-zero map), pointing_hit = the mask at the
    map's hottest voxel (False for an all-zero map, which points nowhere) and mask_fraction_of_brain = the
    share of brain voxels in the mask: the expected mass_in_mask of a map uniform over the brain."""
    mask = np.asarray(mask, bool)
    cam = np.clip(np.asarray(cam, np.float64), 0.0, None)
    if cam.ndim != 3 or mask.ndim != 3:
        raise ValueError(f"cam {cam.shape} and mask {mask.shape} must both be 3D")
    if cam.shape != mask.shape:
        if any(c > m for c, m in zip(cam.shape, mask.shape, strict=True)):
            raise ValueError(f"cam {cam.shape} is finer than the mask {mask.shape}; only upsampling is done")
        with torch.no_grad():
            t = torch.from_numpy(cam)[None, None]
            cam = F.interpolate(t, size=mask.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        cam = np.clip(cam, 0.0, None)
    if brain is None:
        in_brain = np.ones(mask.shape, bool)
    else:
        brain = np.asarray(brain)
        in_brain = (brain != 0).any(0) if brain.ndim == mask.ndim + 1 else brain != 0
        if in_brain.shape != mask.shape:
            raise ValueError(f"brain {brain.shape} does not match the mask {mask.shape}")
    total = float(cam.sum())
    n_brain = int(in_brain.sum())
    return {
        "mass_in_mask": float((cam * mask).sum()) / total if total > 0 else math.nan,
        "pointing_hit": bool(mask.flat[int(np.argmax(cam))]) if total > 0 else False,
        "mask_fraction_of_brain": int((mask & in_brain).sum()) / n_brain if n_brain else math.nan,
    }


def cam_grid(model: ResNet3D, size: int, layer: str) -> tuple[int, int, int]:
    """The native resolution of a Grad-CAM at `layer` for a size^3 input (before grad_cam upsamples it)."""
    if layer not in STAGES:
        raise ValueError(f"layer {layer!r} is not one of {STAGES}")
    p = next(model.parameters())
    h = torch.zeros(1, model.in_channels, size, size, size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(h))))
        for name in STAGES:
            h = getattr(model, name)(h)
            if name == layer:
                break
    model.train(was_training)
    return tuple(int(s) for s in h.shape[2:])


def _seg_paths_of(cache: VolumeCache) -> tuple[dict[str, Path | None], str]:
    """{case id: seg file or None} from the data root recorded in the cache manifest, and why when it cannot."""
    root = cache.manifest.get("data_root")
    if not root or not Path(root).is_dir():
        return {}, f"the cache's data root {root!r} is not available to look for segmentation files"
    try:
        cases = discover_cases(root, skip_incomplete=True).cases
    except DataError as e:
        return {}, f"the cache's data root {root} could not be read ({e})"
    return {c.id: c.seg for c in cases}, "no segmentation file (<case>_seg.nii.gz) in its folder"


def attention_report(
    model: ResNet3D,
    cache: VolumeCache,
    rows,
    channels,
    device: torch.device | str | None = None,
    layer: str = "layer4",
    seg_paths: Mapping[str, str | Path | None] | None = None,
) -> dict:
    """Grad-CAM (HGG class) of each cache row at `layer` (another network than the ResNet-3D: its last feature map;
    a ViT: attention rollout), scored against the case's tumour mask.

    rows: indices into the cache (e.g. a fold's validation rows). channels: the cache channels the model takes.
    seg_paths: {case id: seg file or None}; by default the cases under the data root recorded in the cache.
    A case without a segmentation file is listed as skipped with the reason, not scored. A network that makes no
    map: every case skipped with the reason, and `unavailable` says it.
    Returns {per_case: [{id, mass_in_mask, pointing_hit, chance[, skipped]}], summary, layer, cam_grid
    [, unavailable]}."""
    if not (cache.path / GEOMETRY).is_file():
        raise GliogradeError(
            f"cache {cache.path} keeps no {GEOMETRY} (the per-case crop geometry), so tumour masks cannot be placed "
            "on its grid; prepare the cache again with `gliograde prepare`"
        )
    geometry = cache.geometry()
    if seg_paths is None:
        seg_paths, no_seg = _seg_paths_of(cache)
    else:
        no_seg = "no segmentation file given for it"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels = list(channels)
    per_case, used, unavailable = [], layer, None
    for row in rows:
        row = int(row)
        case_id = cache.ids[row]
        seg = seg_paths.get(case_id)
        reason = None
        if seg is None:
            reason = no_seg
        elif not Path(seg).is_file():
            reason = f"segmentation file {seg} does not exist"
        reason = reason or unavailable
        if reason is not None:
            per_case.append(
                {"id": case_id, "mass_in_mask": math.nan, "pointing_hit": None, "chance": math.nan, "skipped": reason}
            )
            continue
        if case_id not in geometry:
            raise GliogradeError(
                f"cache {cache.path}: {GEOMETRY} has no entry for case {case_id}; prepare the cache again"
            )
        mask = mask_on_cache_grid(seg, geometry[case_id], cache.size)
        volume = np.asarray(cache.volumes[row][channels], np.float32)
        x = torch.from_numpy(volume)[None].to(device)
        cam, used = saliency(model, x, target=HGG, layer=layer)
        if cam is None:  # the network makes no map: this case and the rest skipped, said once
            unavailable = used
            per_case.append({"id": case_id, "mass_in_mask": math.nan, "pointing_hit": None, "chance": math.nan,
                             "skipped": unavailable})  # fmt: skip
            continue
        scores = attention_scores(cam[0].float().cpu().numpy(), mask, volume)
        per_case.append(
            {
                "id": case_id,
                "mass_in_mask": scores["mass_in_mask"],
                "pointing_hit": scores["pointing_hit"],
                "chance": scores["mask_fraction_of_brain"],
            }
        )
    report = {"per_case": per_case, "summary": summarize_attention(per_case), "layer": used}
    if unavailable is not None:
        return {**report, "cam_grid": None, "unavailable": unavailable}
    resnet = isinstance(model, ResNet3D) and used in STAGES
    grid = cam_grid(model, cache.size, used) if resnet else saliency_grid(model, cache.size)
    return {**report, "cam_grid": list(grid) if grid is not None else None}


def summarize_attention(per_case: list[dict]) -> dict:
    """n scored cases, mean mass_in_mask and mean chance (over cases with a finite value), pointing-game accuracy,
    and the skipped cases {id: reason}."""
    skipped = {c["id"]: c["skipped"] for c in per_case if c.get("skipped")}
    scored = [c for c in per_case if not c.get("skipped")]

    def mean(key):
        values = [float(c[key]) for c in scored if c[key] is not None and math.isfinite(float(c[key]))]
        return float(np.mean(values)) if values else math.nan

    hits = [bool(c["pointing_hit"]) for c in scored if c["pointing_hit"] is not None]
    return {
        "n": len(scored),
        "mean_mass_in_mask": mean("mass_in_mask"),
        "mean_chance": mean("chance"),
        "pointing_game_accuracy": float(np.mean(hits)) if hits else math.nan,
        "skipped": skipped,
    }
