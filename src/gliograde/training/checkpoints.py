"""Checkpoints: atomic writes, weights_only reads, and the evaluation policy (best_ema > best > error; never last)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from gliograde.errors import GliogradeError

BEST, BEST_EMA, LAST = "best.pt", "best_ema.pt", "last.pt"


class CheckpointError(GliogradeError):
    pass


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a gliograde checkpoint (no model_state_dict)")
    return ckpt


def select_checkpoint(checkpoints_dir: str | Path, policy: str = "auto", ema_enabled: bool = True) -> Path:
    """The checkpoint for final evaluation (training_journey_summary.md §3.5, §6.6).

    auto: best_ema.pt if EMA was on and the file exists, else best.pt, else an error. best / best_ema: that file.
    last.pt is never an answer: it is the state of the last epoch, not the model selected on validation AUC.
    """
    d = Path(checkpoints_dir)
    if policy == "auto":
        if ema_enabled and (d / BEST_EMA).is_file():
            return d / BEST_EMA
        if (d / BEST).is_file():
            return d / BEST
        raise CheckpointError(
            f"no best checkpoint in {d} (looked for {BEST_EMA if ema_enabled else ''} {BEST}); "
            "last.pt is never used for evaluation"
        )
    if policy not in ("best", "best_ema"):
        raise CheckpointError(f"--checkpoint {policy!r} is not auto, best or best_ema (last.pt is never evaluated)")
    path = d / f"{policy}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return path
