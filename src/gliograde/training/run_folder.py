"""The run folder of one fold: where it lives, what it is made of, and the records written into it apart from the
loop (the configuration and environment, the protocol, a failure, a change of precision on resume).

    results/ResNet50-3D/runs/fold_{k}/run_YYYYMMDD_HHMMSS/        (repeat r > 0: runs/repeat_r/fold_k/...)
        checkpoints/ best.pt last.pt [best_ema.pt]    metrics/metrics.json    plots/*.png    tensorboard/
        predictions/ val_probs.npy (at the operating point) val_probs_raw.npy val_preds.npy val_labels.npy
                     val_ids.json [val_slices.npy val_attention.npy: MIL]    config/config.json    logs/*.log
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gliograde import runtime
from gliograde.config import TrainConfig
from gliograde.files import new_stamped_dir, write_json
from gliograde.provenance import provenance
from gliograde.training.distributed import Dist

log = logging.getLogger("gliograde")
RUN_DIRS = ("checkpoints", "metrics", "plots", "predictions", "config", "logs")


def fold_parent(output_dir: str, fold: int, repeat: int = 0) -> Path:
    """runs/fold_k (the seeds' layout) for repeat 0, runs/repeat_r/fold_k for the other repeats."""
    runs = Path(output_dir) / "runs"
    return (runs if repeat == 0 else runs / f"repeat_{repeat}") / f"fold_{fold}"


def new_run_dir(output_dir: str, fold: int, repeat: int = 0) -> Path:
    """fold_parent/run_YYYYMMDD_HHMMSS, with a suffix when two runs start in the same second (never shared)."""
    run = new_stamped_dir(fold_parent(output_dir, fold, repeat), "run")
    for sub in RUN_DIRS:
        (run / sub).mkdir()
    return run


def mark_failed(d: Dist, run_dir: Path, cfg: TrainConfig, resume, error: BaseException) -> None:
    """A new run that failed before it finished says so in metrics.json (status "failed" and the reason), so that a
    folder left by, say, an unreadable --pretrained-path is never mistaken for an interrupted or finished run.
    An interrupted run (KeyboardInterrupt) and a resumed one keep their state for --resume."""
    if not d.main or resume is not None:
        return
    path = run_dir / "metrics" / "metrics.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    write_json(path, {**previous, "status": "failed", "fold": cfg.fold, "repeat": cfg.repeat, "final": None,
                      "reason": f"{type(error).__name__}: {reason}"})  # fmt: skip


def protocol_record(cfg, split) -> dict:
    """How the reported numbers were obtained, in words a reader of metrics.json / summary.md can check."""
    inner = cfg.selection == "inner"
    label = (
        "inner: epoch, checkpoint, threshold and calibration chosen on the selection part of the training patients"
        if inner
        else "outer: selected on the reported folds (optimistic)"
    )
    return {
        "selection": {
            "protocol": cfg.selection,
            "label": label,
            "n_fit": len(split.fit if inner else split.train),
            "n_select": len(split.select) if inner else 0,
            "n_reported": len(split.val),
        }
    }


def record_precision_change(run_dir: Path, epoch: int, before: str, precision: runtime.Precision) -> None:
    path = run_dir / "config" / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        change = {"after_epoch": epoch, "from": before, "to": precision.name, "reason": precision.reason}
        config.setdefault("precision_changes", []).append(change)
        write_json(path, config)


def write_run_config(run_dir, cfg, cache, device, precision, plan, data_path, split, folds) -> None:
    write_json(
        run_dir / "config" / "config.json",
        {
            # the cache by absolute path, so that `evaluate` finds it from any working directory
            "config": {**cfg.to_dict(), "cache_dir": str(cache.path.resolve())},
            "environment": {**runtime.environment(device, precision), "processes": plan.world, "data_path": data_path},
            "seed": cfg.seed,
            "batch": plan.to_dict(),
            "provenance": provenance(cfg.pretrained_path, cache.path, folds),
            "split": {key: [cache.ids[r] for r in getattr(split, key)] for key in ("fit", "select", "val")},
            "run_dir": str(run_dir),
        },
    )
    log.info("Run folder: %s", run_dir)
