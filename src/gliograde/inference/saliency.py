"""The saliency figure of a case (Grad-CAM itself: networks/gradcam.py).

Grad-CAM is written on the network's own stages instead of module hooks: the gradient of the HGG logit with respect to a
stage's output weights its channels (Selvaraju et al., 2017). The map is as coarse as the stage (layer4: 4^3 for a
128^3 input in the strided layout, 16^3 in MedicalNet's dilated one) and is upsampled trilinearly. The figure cuts
the FLAIR through the map's centre of mass in the brain (not through its hottest voxel, which often sits at the
brain's rim) and labels the views' directions, the background and the decision with its threshold.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from gliograde.evaluation.plots import save_figure

# the patient's directions at each view's (left, right, top, bottom) edge, as `views` draws a RAS volume
VIEWS = {
    "sagittal": ("P", "A", "S", "I"),
    "coronal": ("L", "R", "S", "I"),
    "axial": ("L", "R", "A", "P"),
}
EDGES = ((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"), (0.5, 0.98, "center", "top"),
         (0.5, 0.02, "center", "bottom"))  # fmt: skip


def map_centre(heat: np.ndarray, brain: np.ndarray) -> tuple[int, int, int]:
    """The voxel to cut the views through: the centre of mass of the map inside the brain (a lone peak at the
    brain's rim would give a sliver of a sagittal view), moved to the nearest brain voxel where the centroid of a
    curved mass falls outside it; the peak when the map is empty in the brain."""
    w = np.where(brain, np.clip(heat, 0, None), 0.0)
    if w.sum() <= 0:
        return tuple(int(i) for i in np.unravel_index(np.argmax(heat), heat.shape))
    axes = ((1, 2), (0, 2), (0, 1))  # each axis's marginal: no (3, X, Y, Z) index grid in memory
    centre = np.array([w.sum(a) @ np.arange(n) for a, n in zip(axes, heat.shape, strict=True)]) / w.sum()
    voxel = tuple(int(i) for i in np.rint(centre))
    if brain[voxel]:
        return voxel
    inside = np.argwhere(brain & (w > 0))
    return tuple(int(i) for i in inside[np.argmin(((inside - centre) ** 2).sum(1))])


def views(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, tuple[str, np.ndarray]]:
    """The three slices of a canonical (RAS) volume through `centre`, as drawn (rot90: superior or anterior up, the
    patient's left on the left), each with its slice index."""
    x, y, z = centre
    return {
        "sagittal": (f"x={x}", np.rot90(volume[x])),
        "coronal": (f"y={y}", np.rot90(volume[:, y])),
        "axial": (f"z={z}", np.rot90(volume[:, :, z])),
    }


def saliency_png(saliency: nib.Nifti1Image, flair_path: Path, path: Path, title: str) -> dict:
    """Three orthogonal FLAIR slices through the map's centre of mass in the brain, the map overlaid, each view
    with its orientation letters (RAS, the patient's left on the left) and slice index. Returns the centre and the
    hottest voxel (in the image's canonical RAS voxel order)."""
    flair = nib.as_closest_canonical(nib.load(str(flair_path))).get_fdata(dtype=np.float32)
    heat = nib.as_closest_canonical(saliency).get_fdata(dtype=np.float32)
    if flair.shape != heat.shape:
        raise ValueError(f"saliency grid {heat.shape} differs from the FLAIR grid {flair.shape}")
    peak = tuple(int(i) for i in np.unravel_index(np.argmax(heat), heat.shape))
    c = map_centre(heat, flair != 0)
    background, maps = views(flair, c), views(heat, c)
    fig = Figure(figsize=(12, 4.4))
    fig.subplots_adjust(left=0.01, right=0.88, bottom=0.02, top=0.8, wspace=0.04)
    hi = float(np.percentile(flair[flair > 0], 99.5)) if (flair > 0).any() else 1.0
    for k, (name, (where, img)) in enumerate(background.items()):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(img, cmap="gray", vmin=0, vmax=hi)
        shown = ax.imshow(np.ma.masked_less(maps[name][1], 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set(title=f"{name} ({where})", xticks=[], yticks=[])
        for letter, (x, y, ha, va) in zip(VIEWS[name], EDGES, strict=True):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=11, fontweight="bold")
    fig.colorbar(shown, ax=fig.axes, shrink=0.8, pad=0.02, label="Grad-CAM of the HGG logit (ensemble, peak = 1)")
    fig.suptitle(f"{title}\nbackground: FLAIR; slices through the map's centre of mass in the brain, voxel {c} "
                 f"(peak {peak}); RAS, patient's left on the left", fontsize=10)  # fmt: skip
    save_figure(fig, path, dpi=90, tight=False)  # the shared colour bar does not fit tight_layout
    return {"centre_voxel_ras": list(c), "peak_voxel_ras": list(peak)}
