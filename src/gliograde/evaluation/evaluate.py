"""`gliograde evaluate`: re-score a finished (or interrupted) fold from its checkpoint, the saved folds and the cache.

It rebuilds the fold's validation set exactly as training did, loads the checkpoint chosen by the policy
(auto = best_ema if present, else best; never last), recomputes every metric and figure and writes them into a new
`evaluation_YYYYMMDD_HHMMSS/` folder of the run. Nothing of the run is overwritten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from gliograde import runtime
from gliograde.checkpoints import load_checkpoint, select_checkpoint
from gliograde.config import load_run_config, with_split
from gliograde.data.loader_path import CacheDataset, make_val_loader
from gliograde.data.source import load_data
from gliograde.data.splits import fold_split
from gliograde.errors import GliogradeError
from gliograde.evaluation import plots
from gliograde.evaluation.calibration import OperatingPoint, fit_operating_point
from gliograde.evaluation.scoring import evaluate_checkpoint, model_from_checkpoint
from gliograde.files import new_stamped_dir, write_json
from gliograde.networks import get_architecture
from gliograde.networks.gradcam import ROLLOUT
from gliograde.runs import run_environment
from gliograde.training.losses import make_loss

log = logging.getLogger("gliograde")


class EvaluationError(GliogradeError):
    pass


def attention_check(run_dir: Path, checkpoint: str, cache, rows, channels, device, layer: str, out: Path,
                    model_name: str = "resnet3d") -> dict:  # fmt: skip
    """The saliency map of the evaluated checkpoint (Grad-CAM; a ViT's attention rollout) against the tumour masks of
    the reported cases; the summary is returned, the per-case figures go to out/attention.json. A network that makes
    no map: said in one line, and in the summary (`unavailable`)."""
    from gliograde.evaluation.attention import attention_report

    path = run_dir / "checkpoints" / checkpoint
    model = model_from_checkpoint(load_checkpoint(path), path, model_name).to(device)
    report = attention_report(model, cache, rows, channels, device, layer)
    write_json(out / "attention.json", report)
    s = report["summary"]
    if report.get("unavailable"):
        log.warning("Attention: %s; nothing measured for the %d cases", report["unavailable"], len(s["skipped"]))
        return {**s, "layer": None, "cam_grid": None, "unavailable": report["unavailable"],
                "file": str(out / "attention.json")}  # fmt: skip
    log.info(
        "Attention (%s, %s grid %s): %.1f %% of the map's mass in the tumour (chance %.1f %%), pointing game "
        "%.2f over %d cases (%d skipped)",
        report["layer"],
        "rollout" if report["layer"] == ROLLOUT else "Grad-CAM",
        report.get("cam_grid"),
        100 * s["mean_mass_in_mask"],
        100 * s["mean_chance"],
        s["pointing_game_accuracy"],
        s["n"],
        len(s["skipped"]),
    )
    return {**s, "layer": report["layer"], "cam_grid": report.get("cam_grid"), "file": str(out / "attention.json")}


def read_final(run_dir: Path) -> dict:
    path = run_dir / "metrics" / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{path} cannot be read ({type(e).__name__}); is the run complete?") from e
    if metrics.get("status") != "complete" or not metrics.get("final"):
        raise EvaluationError(f"{run_dir} is not a complete run ({path} has no final results); nothing to re-score")
    return metrics["final"]


@dataclass
class Evaluation:
    out_dir: Path
    metrics: dict


def _run_data(cfg, run_dir: Path, cache_dir: str | None):
    """(cfg with the saved split, the run's cache (moved: --cache-dir), its fold's split), checked to be the patients
    the run was validated on."""
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    try:
        cache, folds = load_data(cfg)
    except GliogradeError as e:
        raise EvaluationError(f"{e} (the run was trained on the cache {cfg.cache_dir}; pass --cache-dir)") from e
    cfg = with_split(cfg, folds)
    split = fold_split(cache, folds, cfg.fold, cfg.repeat)
    val_ids = [cache.ids[r] for r in split.val]
    saved_ids = run_dir / "predictions" / "val_ids.json"
    if saved_ids.is_file() and sorted(json.loads(saved_ids.read_text())) != sorted(val_ids):
        raise EvaluationError(
            f"the validation patients of fold {cfg.fold} in {cache.path / 'folds.json'} are not the ones this run was "
            f"validated on ({saved_ids}); the folds changed since training, so a re-score would not be comparable"
        )
    return cfg, cache, split


def _write_evaluation(run_dir, cfg, policy, cache, val_rows, val_ids, channels, device, final, probs, labels, stored,
                      attention, layer) -> Path:
    """A new evaluation_* folder: predictions, figures, [attention], metrics.json; returns it."""
    out = new_stamped_dir(run_dir, "evaluation")
    np.save(out / "val_probs.npy", probs)
    np.save(out / "val_preds.npy", (probs >= final["threshold"]).astype(np.int64))
    np.save(out / "val_labels.npy", labels)
    write_json(out / "val_ids.json", val_ids)
    title = f"fold {cfg.fold}, re-evaluated ({final['checkpoint']}, epoch {final['best_epoch']})"
    plots.confusion(final["confusion_matrix"], out / "confusion_matrix.png", title)
    plots.roc(labels, probs, out / "roc_curve.png", title, final["auc"])
    plots.pr(labels, probs, out / "pr_curve.png", title)
    if attention:
        final["attention"] = attention_check(
            run_dir, final["checkpoint"], cache, val_rows, channels, device, layer, out, cfg.model
        )
    write_json(
        out / "metrics.json",
        {
            "run_dir": str(run_dir),
            "fold": cfg.fold,
            "policy": policy,
            "cache": str(cache.path),
            "device": str(device),
            "torch": torch.__version__,
            "evaluated_at": datetime.now().isoformat(timespec="seconds"),
            "final": final,
        },
    )
    log.info(
        "Fold %d re-evaluated: AUC %.4f (reported %s) F1 %.4f accuracy %.4f sensitivity %.4f specificity %.4f -> %s",
        cfg.fold,
        final["auc"],
        "n/a" if stored is None else f"{stored:.4f}",
        final["f1"],
        final["accuracy"],
        final["sensitivity"],
        final["specificity"],
        out,
    )
    return out


def evaluate_run(
    run_dir: str | Path,
    policy: str = "auto",
    cache_dir: str | None = None,
    attention: bool = False,
    layer: str = "layer4",
    device: str | None = None,
    precision: str = "auto",
) -> Evaluation:
    """Re-score a run's selected checkpoint on its reported patients, at the run's operating point, into a new
    evaluation_* folder. `attention`: also measure where the model looks (Grad-CAM at `layer` against each case's
    tumour mask: the mass inside it and the pointing game), written to attention.json and into metrics.json.
    `device`: auto | cuda | cpu (default: the run's own device setting). `precision`: auto = the run's own precision
    (recorded in its config.json) where it runs on the same kind of device, else the rule for this device."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if attention and get_architecture(cfg.model, "the run's model").slice_attention:
        raise EvaluationError(
            f"--attention measures the 3D model's Grad-CAM; a {cfg.model} run records its slice attention instead "
            "(predictions/val_attention.npy)"
        )
    cfg, cache, split = _run_data(cfg, run_dir, cache_dir)
    val_rows = split.val
    val_ids = [cache.ids[r] for r in val_rows]
    # the operating point the run fitted (on its selection part with inner); re-scoring applies it unchanged
    run_final = read_final(run_dir)
    point = OperatingPoint.from_dict(run_final["operating_point"]) if run_final.get("operating_point") else None
    chosen = select_checkpoint(run_dir / "checkpoints", policy, ema_enabled=cfg.ema_decay > 0).name
    refit = cfg.selection == "inner" and point is not None and chosen != run_final.get("checkpoint")
    if refit:  # the stored point belongs to the run's own checkpoint: fit this one's on the same selection part
        log.info("%s is not the run's selected %s: fitting its operating point on the selection part", chosen,
                 run_final.get("checkpoint"))  # fmt: skip

    device = runtime.pick_device(device or ("cuda" if cfg.gpu else cfg.device))
    recorded = run_environment(run_dir)
    decided = runtime.reuse_precision(recorded.get("precision"), recorded.get("device"), device, precision)
    log.info("Precision: %s", decided.reason)
    channels = cache.channels(cfg.modalities)
    loader = make_val_loader(CacheDataset(cache, val_rows, channels), cfg.batch_size, 0, device.type == "cuda")
    train_rows = split.fit if cfg.selection == "inner" else split.train
    counts = np.bincount(cache.labels[train_rows], minlength=2).tolist()
    loss_fn = make_loss(cfg, counts, f"{run_dir}: the run's loss").to(device)  # unweighted: DRW is not replayed
    final = evaluate_checkpoint(
        run_dir / "checkpoints",
        cfg.ema_decay > 0,
        loader,
        device,
        decided,
        loss_fn,
        policy,
        point=None if refit else point,
        expected=cfg.model,
        classes=cache.classes,
        # inner: the checkpoint's stored AUC belongs to the selection part, so it is re-checked there (like with like)
        select_loader=make_val_loader(CacheDataset(cache, split.select, channels), cfg.batch_size, 0, False)
        if cfg.selection == "inner"
        else None,
        fit_point=(
            lambda labels, raw: fit_operating_point(
                labels, raw, counts, cfg.sampler, specificity=cfg.threshold_at_specificity, temperature=cfg.temperature
            )
        )
        if refit
        else None,
    )
    probs, labels = final.pop("_probs"), final.pop("_labels")
    final.pop("_raw_probs")
    final.pop("_attention")
    stored = None if refit else run_final.get("auc")  # the run's reported AUC: what a re-score must reproduce
    final["reported_auc"] = stored
    final["auc_difference"] = None if stored is None else abs(final["auc"] - stored)
    final["selection"] = run_final.get("selection")

    out = _write_evaluation(run_dir, cfg, policy, cache, val_rows, val_ids, channels, device, final, probs, labels,
                            stored, attention, layer)  # fmt: skip
    return Evaluation(out, final)
