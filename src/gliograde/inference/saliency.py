"""Grad-CAM on a residual stage (layer4 by default), and its figure.

Written on the network's own stages instead of module hooks: the gradient of the HGG logit with respect to a
stage's output weights its channels (Selvaraju et al., 2017). The map is as coarse as the stage (layer4: 4^3 for a
128^3 input in the strided layout, 16^3 in MedicalNet's dilated one) and is upsampled trilinearly.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from gliograde.evaluation.plots import save_figure
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


def saliency_png(saliency: nib.Nifti1Image, flair_path: Path, path: Path, title: str) -> tuple[int, int, int]:
    """Three orthogonal slices of the FLAIR through the hottest voxel, the map overlaid; returns that voxel
    (in the image's canonical RAS voxel order)."""
    flair = nib.as_closest_canonical(nib.load(str(flair_path))).get_fdata(dtype=np.float32)
    heat = nib.as_closest_canonical(saliency).get_fdata(dtype=np.float32)
    if flair.shape != heat.shape:
        raise ValueError(f"saliency grid {heat.shape} differs from the FLAIR grid {flair.shape}")
    peak = tuple(int(i) for i in np.unravel_index(np.argmax(heat), heat.shape))
    views = [
        ("sagittal", flair[peak[0]], heat[peak[0]]),
        ("coronal", flair[:, peak[1]], heat[:, peak[1]]),
        ("axial", flair[:, :, peak[2]], heat[:, :, peak[2]]),
    ]
    fig = Figure(figsize=(12, 4.4))
    hi = float(np.percentile(flair[flair > 0], 99.5)) if (flair > 0).any() else 1.0
    for k, (name, img, cam) in enumerate(views):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=hi)  # rows = superior/anterior up
        shown = ax.imshow(np.rot90(np.ma.masked_less(cam, 0.05)), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set(title=name, xticks=[], yticks=[])
    fig.colorbar(shown, ax=fig.axes, shrink=0.8, label="Grad-CAM (HGG)")
    fig.suptitle(f"{title}; slices through voxel {peak}")
    save_figure(fig, path, dpi=90, tight=False)  # the shared colour bar does not fit tight_layout
    return peak
