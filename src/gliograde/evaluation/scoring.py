"""Scoring a model on a loader, and re-scoring a run's selected checkpoint (used by training and `evaluate`)."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from gliograde import GRADES, runtime
from gliograde.checkpoints import CheckpointError, checkpoint_logit_scale, load_checkpoint, select_checkpoint
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.metrics import compute_metrics
from gliograde.networks import ArchitectureError, build_from_description

log = logging.getLogger("gliograde")


@torch.no_grad()
def score_loader(
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
        raise ValueError("score_loader: the loader yielded no batches")
    return float(total) / max(n, 1), torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()


def model_from_checkpoint(ckpt: dict, path: Path, expected: str | None = None) -> torch.nn.Module:
    """The network a gliograde checkpoint describes (its `arch` record, built through the table of architectures),
    with its weights, in eval mode. `expected`: the architecture (resnet3d | mil2d) the caller needs; another is an
    error naming both. A description that cannot be rebuilt is one line naming what differs."""
    arch = ckpt.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} has no architecture record; it was not written by gliograde's trainer")
    kind = arch.get("model", "resnet3d")
    if expected is not None and kind != expected:
        raise CheckpointError(f"{path} holds a {kind} model, but a {expected} model was asked for")
    try:
        model = build_from_description(arch, ckpt["model_state_dict"])
    except ArchitectureError as e:
        raise CheckpointError(f"{path}: {e}") from None
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
    point: OperatingPoint | None = None,
    select_loader=None,
    fit_point=None,
    expected: str | None = None,
    classes: tuple[str, str] = GRADES,
) -> dict:
    """Load the checkpoint chosen by the policy and score the reported patients (`val_loader`) once (`classes`: the
    names of labels 0 and 1, the cache's target).

    `precision` is a decided `runtime.Precision` (training's, or the run's own reused by `evaluate`), or a
    (--precision, --amp) request decided here by `runtime.decide_precision`.
    `select_loader`: the patients the checkpoint was selected on (the selection part under inner selection; None
    under outer, where they are the reported fold). The checkpoint's stored AUC is re-checked there, like with like.
    The operating point (prior correction, temperature, threshold) is `point`, or `fit_point(labels, raw_probs)` on
    the predictions of `select_loader` (inner selection: fitted on the selection part, never on the reported fold).
    The result holds every metric at the operating point, the operating point, the precision record,
    plus `_probs` (calibrated), `_raw_probs` and `_labels` (arrays, for the caller).
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
    logit_scale = checkpoint_logit_scale(ckpt)  # the loss's, as the checkpoint recorded it
    # decided already (training's decision, or the run's own reused by `evaluate`), or by the rule for this device
    decided = precision if isinstance(precision, runtime.Precision) else runtime.decide_precision(*precision, device)
    dtype = decided.dtype
    recheck = None
    if select_loader is not None:
        _, sel_probs, sel_labels = score_loader(model, select_loader, device, dtype, loss_fn, logit_scale)
        recheck = compute_metrics(sel_labels, sel_probs)["auc"]
        if point is None and fit_point is not None:
            point = fit_point(sel_labels, sel_probs)
    bags: list | None = [] if hasattr(model, "last_attention") else None  # MIL: which slices, how much weight
    loss, raw, labels = score_loader(model, val_loader, device, dtype, loss_fn, logit_scale, bags)
    if recheck is None:
        recheck = compute_metrics(labels, raw)["auc"]
    if stored is not None and not math.isnan(stored) and abs(recheck - stored) > 0.01:
        log.warning(
            "Re-scored AUC %.4f on the %s differs from the checkpoint's stored AUC %.4f there by more than 0.01",
            recheck, "selection part" if select_loader is not None else "reported fold", stored,
        )  # fmt: skip
    point = point or OperatingPoint(0.5, 0.5)
    probs = point.apply(raw)
    m = compute_metrics(labels, probs, point.threshold, classes)
    return {
        **m,
        "loss": loss,
        "best_epoch": int(ckpt["epoch"]),
        "checkpoint": path.name,
        "checkpoint_auc": stored,
        "recheck_auc": recheck,
        "used_ema": bool(ckpt.get("is_ema")),
        "classes": list(classes),
        "threshold": point.threshold,
        "operating_point": point.to_dict(),
        "precision": decided.to_dict(),
        "_probs": probs,
        "_raw_probs": raw,
        "_labels": labels,
        "_attention": (np.concatenate([b[0] for b in bags]), np.concatenate([b[1] for b in bags])) if bags else None,
    }
