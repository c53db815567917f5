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
from gliograde.evaluation.metrics import compute_metrics
from gliograde.networks.resnet3d import ResNet3D
from gliograde.training.checkpoints import CheckpointError, load_checkpoint, select_checkpoint

log = logging.getLogger("gliograde")


@torch.no_grad()
def predict(model, loader, device, dtype, loss_fn) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, P(HGG), labels) over a loader, in eval mode and without gradients."""
    model.eval()
    total, n, probs, labels = 0.0, 0, [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(x)
        total += float(loss_fn(logits, y)) * len(y)
        n += len(y)
        probs.append(torch.softmax(logits.float(), 1)[:, 1].cpu())
        labels.append(y.cpu())
    return total / max(n, 1), torch.cat(probs).numpy(), torch.cat(labels).numpy()


def model_from_checkpoint(ckpt: dict, path: Path) -> ResNet3D:
    """The network a gliograde checkpoint describes (its `arch` record), with its weights, in eval mode."""
    arch = ckpt.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} has no architecture record; it was not written by gliograde's trainer")
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
    precision: tuple[str, bool | None],
    loss_fn,
    policy: str = "auto",
) -> dict:
    """Load the checkpoint chosen by the policy, re-score the validation set, compare with the stored AUC.

    `precision` is the run's (--precision, --amp) request; the decision, bf16 self-check included, is
    `runtime.decide_precision`'s on this model and a real validation batch, the same as training made.
    The result holds every metric, the precision record, plus `_probs` and `_labels` (arrays, for the caller).
    """
    path = select_checkpoint(checkpoints_dir, policy, ema_enabled=ema_enabled)
    ckpt = load_checkpoint(path, map_location="cpu")
    stored = ckpt.get("val_metrics", {}).get("auc")
    log.info(
        "Using %s checkpoint: %s (epoch %s, stored validation AUC %.4f)",
        "EMA best" if ckpt.get("is_ema") else "regular best",
        path.name,
        ckpt["epoch"],
        stored if stored is not None else math.nan,
    )
    model = model_from_checkpoint(ckpt, path).to(device)
    batches = iter(val_loader)  # may be one-shot (the device path's generator): the first batch is put back
    first = next(batches)
    decided = runtime.decide_precision(*precision, device, model, first[0][:2].to(device))
    loss, probs, labels = predict(model, itertools.chain([first], batches), device, decided.dtype, loss_fn)
    m = compute_metrics(labels, probs)
    if stored is not None and not math.isnan(stored) and abs(m["auc"] - stored) > 0.01:
        log.warning(
            "Evaluation AUC %.4f differs from the checkpoint's stored AUC %.4f by more than 0.01", m["auc"], stored
        )
    return {
        **m,
        "loss": loss,
        "best_epoch": int(ckpt["epoch"]),
        "checkpoint": path.name,
        "checkpoint_auc": stored,
        "used_ema": bool(ckpt.get("is_ema")),
        "classes": list(GRADES),
        "precision": decided.to_dict(),
        "_probs": probs,
        "_labels": labels,
    }
