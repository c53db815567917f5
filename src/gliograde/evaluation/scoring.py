"""Scoring a model on a loader, and re-scoring a run's selected checkpoint (used by training and `evaluate`)."""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from gliograde import GRADES, runtime
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.metrics import compute_metrics
from gliograde.networks.resnet3d import ResNet3D
from gliograde.training.checkpoints import CheckpointError, load_checkpoint, select_checkpoint

log = logging.getLogger("gliograde")


@torch.no_grad()
def predict(
    model, loader, device, dtype, loss_fn, logit_scale: float = 1.0, collect: list | None = None,
    allow_empty: bool = False,
) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, P(HGG), labels) over a loader, in eval mode and without gradients. The loss and the predictions
    are accumulated on the device and read once at the end. P(HGG) is softmax(logit_scale x logits): LDAM's
    probabilities come from the scaled logits its loss used (s), cross-entropy's from the logits (1).
    `collect`: a list that receives each batch's (slice indices, attention weights) of a MIL model.
    `allow_empty`: a DDP rank whose share of a small set is empty returns (nan, [], []) instead of an error."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n, probs, labels = 0, [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(x)
        total += loss_fn(logits, y).double() * len(y)
        n += len(y)
        probs.append(torch.softmax(logit_scale * logits.float(), 1)[:, 1])
        labels.append(y)
        if collect is not None and getattr(model, "last_attention", None) is not None:
            collect.append((model.last_slices.cpu().numpy(), model.last_attention.float().cpu().numpy()))
    if not probs:
        if allow_empty:
            return math.nan, np.empty(0, np.float32), np.empty(0, np.int64)
        raise ValueError("predict: the loader yielded no batches")
    return float(total) / max(n, 1), torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()


def model_from_checkpoint(ckpt: dict, path: Path, expected: str | None = None) -> ResNet3D:
    """The network a gliograde checkpoint describes (its `arch` record), with its weights, in eval mode.
    `expected`: the model kind (resnet3d | mil2d) the caller needs; another kind is an error naming both."""
    arch = ckpt.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} has no architecture record; it was not written by gliograde's trainer")
    kind = arch.get("model", "resnet3d")
    if expected is not None and kind != expected:
        raise CheckpointError(f"{path} holds a {kind} model, but a {expected} model was asked for")
    if arch.get("model", "resnet3d") == "mil2d":
        from gliograde.networks.mil import MILResNet2D

        model = MILResNet2D(arch["depth"], arch["in_channels"], arch["num_classes"], arch["k"], arch["pooling"],
                            arch.get("dropout", 0.0), arch.get("min_gap", 0),
                            entropy_channel=arch.get("entropy_channel"))  # fmt: skip
    else:
        model = ResNet3D(arch["depth"], arch["in_channels"], arch["num_classes"], arch["shortcut"], arch["layout"])
    try:
        model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit its own recorded architecture: {e}") from e
    return model.eval()


def evaluate_checkpoint(
    checkpoints_dir: Path,
    ema_enabled: bool,
    val_loader,
    device,
    precision: tuple[str, bool | None] | runtime.Precision,
    loss_fn,
    policy: str = "auto",
    *,
    logit_scale: float = 1.0,
    point: OperatingPoint | None = None,
    select_loader=None,
    fit_point=None,
    expected: str | None = None,
) -> dict:
    """Load the checkpoint chosen by the policy and score the reported patients (`val_loader`) once.

    `precision` is a decided `runtime.Precision` (training's, or the run's own reused by `evaluate`), or a
    (--precision, --amp) request decided here by `runtime.decide_precision`.
    The operating point (prior correction, temperature, threshold) is `point`, or `fit_point(labels, raw_probs)` on
    the predictions of `select_loader` (inner selection: fitted on the selection part, never on the reported fold).
    The stored AUC of the checkpoint is re-checked on the set it was selected on (the selection part with inner,
    the reported fold with outer). The result holds every metric at the operating point, the operating point, the
    precision record, plus `_probs` (calibrated), `_raw_probs` and `_labels` (arrays, for the caller).
    """
    path = select_checkpoint(checkpoints_dir, policy, ema_enabled=ema_enabled)
    ckpt = load_checkpoint(path, map_location="cpu")
    stored = ckpt.get("val_metrics", {}).get("auc")
    log.info(
        "Using %s checkpoint: %s (epoch %s, stored AUC %.4f on the set it was selected on)",
        "EMA best" if ckpt.get("is_ema") else "regular best",
        path.name,
        ckpt["epoch"],
        stored if stored is not None else math.nan,
    )
    model = model_from_checkpoint(ckpt, path, expected).to(device)
    batches = iter(val_loader)  # may be one-shot (the device path's generator): the first batch is put back
    first = next(batches)
    # decided already (training's decision, or the run's own reused by `evaluate`), or by the rule for this device
    decided = precision if isinstance(precision, runtime.Precision) else runtime.decide_precision(*precision, device)
    dtype = decided.dtype
    recheck = None
    if select_loader is not None:
        _, sel_probs, sel_labels = predict(model, select_loader, device, dtype, loss_fn, logit_scale)
        recheck = compute_metrics(sel_labels, sel_probs)["auc"]
        point = fit_point(sel_labels, sel_probs)
    bags: list | None = [] if hasattr(model, "last_attention") else None  # MIL: which slices, how much weight
    loss, raw, labels = predict(model, itertools.chain([first], batches), device, dtype, loss_fn, logit_scale, bags)
    if recheck is None:
        recheck = compute_metrics(labels, raw)["auc"]
    if stored is not None and not math.isnan(stored) and abs(recheck - stored) > 0.01:
        log.warning(
            "Re-scored AUC %.4f differs from the checkpoint's stored AUC %.4f by more than 0.01", recheck, stored
        )
    point = point or OperatingPoint(0.5, 0.5)
    probs = point.apply(raw)
    m = compute_metrics(labels, probs, point.threshold)
    return {
        **m,
        "loss": loss,
        "best_epoch": int(ckpt["epoch"]),
        "checkpoint": path.name,
        "checkpoint_auc": stored,
        "recheck_auc": recheck,
        "used_ema": bool(ckpt.get("is_ema")),
        "classes": list(GRADES),
        "threshold": point.threshold,
        "operating_point": point.to_dict(),
        "precision": decided.to_dict(),
        "_probs": probs,
        "_raw_probs": raw,
        "_labels": labels,
        "_attention": (np.concatenate([b[0] for b in bags]), np.concatenate([b[1] for b in bags])) if bags else None,
    }
