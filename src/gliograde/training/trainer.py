"""Train one fold, top to bottom: set-up, the epoch loop (train, validate, checkpoint, stop), final evaluation.

The run folder (training_journey_summary.md / resnet50_3d_training_guide.md):

    results/ResNet50-3D/runs/fold_{k}/run_YYYYMMDD_HHMMSS/
        checkpoints/ best.pt last.pt [best_ema.pt]    metrics/metrics.json    plots/*.png
        predictions/ val_probs.npy val_preds.npy val_labels.npy val_ids.json    config/config.json    logs/*.log
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from gliograde import __version__
from gliograde.config import TrainConfig, validate
from gliograde.data.augment import AugmentParams, augment_batch
from gliograde.data.brats import resolve_data_root
from gliograde.data.cache import VolumeCache, default_cache_path, open_cache, prepare_cache
from gliograde.data.loader import CacheDataset, make_loaders
from gliograde.data.splits import fold_indices, folds_for_cache
from gliograde.errors import GliogradeError
from gliograde.evaluation.metrics import compute_metrics
from gliograde.evaluation.plots import PlotWriter
from gliograde.evaluation.scoring import evaluate_checkpoint, predict
from gliograde.networks import build_model
from gliograde.networks.resnet3d import ResNet3D
from gliograde.training.checkpoints import BEST, BEST_EMA, LAST, load_checkpoint, save_checkpoint
from gliograde.training.losses import drw_active, drw_weights, make_loss

log = logging.getLogger("gliograde")
RUN_DIRS = ("checkpoints", "metrics", "plots", "predictions", "config", "logs")


class TrainingError(GliogradeError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    history: list[dict]


# ------------------------------------------------------------------------------------------------ set-up helpers
def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.multi_gpu and torch.cuda.device_count() < 2:
        log.warning("--multi-gpu: %d GPU(s) visible, training on one device", torch.cuda.device_count())
    elif cfg.multi_gpu:
        log.warning("--multi-gpu: distributed training is not available yet; training on one GPU")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.gpu:
        log.warning("--gpu: CUDA is not available (CPU build of torch, or no GPU); training on the CPU")
    return torch.device("cpu")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); off on the CPU unless --amp."""
    use = cfg.amp if cfg.amp is not None else device.type == "cuda"
    if not use:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_data(cfg: TrainConfig) -> tuple[VolumeCache, dict]:
    """The cache (a folder given by --cache-dir, else prepared from the data root if missing or stale) and folds."""
    direct = Path(cfg.cache_dir)
    if (direct / "manifest.json").is_file():
        cache = open_cache(direct)
    else:
        root = resolve_data_root(cfg.data_root)
        log.info("Preparing (or checking) the volume cache of %s ...", root)
        cache = open_cache(prepare_cache(root, default_cache_path(root, cfg.size, cfg.cache_dir), size=cfg.size).path)
    if cache.size != cfg.size:
        raise GliogradeError(f"cache {cache.path} holds {cache.size}^3 volumes, but --size is {cfg.size}")
    return cache, folds_for_cache(cache, cfg.folds, cfg.split_seed)


def new_run_dir(output_dir: str, fold: int) -> Path:
    """runs/fold_k/run_YYYYMMDD_HHMMSS, with a suffix when two runs start in the same second (never shared)."""
    parent = Path(output_dir) / "runs" / f"fold_{fold}"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for n in range(1, 1000):
        run = parent / (f"run_{stamp}" if n == 1 else f"run_{stamp}_{n}")
        try:
            run.mkdir()
        except FileExistsError:
            continue
        for sub in RUN_DIRS:
            (run / sub).mkdir()
        return run
    raise TrainingError(f"could not create a new run folder in {parent}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import monai

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "gliograde": __version__,
        "git_commit": git_commit(),
        "device": f"{device.type}: {name}",
    }


def make_optimizer(model: ResNet3D, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the backbone at lr, the classifier at lr x classifier_lr_mult."""
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.lr, "name": "backbone"},
        {"params": model.head_parameters(), "lr": cfg.lr * cfg.classifier_lr_mult, "name": "head"},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped once per optimizer step: linear warmup, then cosine to zero / steps of gamma / constant."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def improved(auc: float, f1: float, best: dict, min_delta: float) -> bool:
    """Validation AUC is the monitor, F1 breaks ties."""
    if math.isnan(auc):
        return False
    return auc > best["auc"] + min_delta or (abs(auc - best["auc"]) <= 1e-12 and f1 > best["f1"])


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std())}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- the fold
def train_fold(cfg: TrainConfig, on_epoch_end=None) -> RunResult:
    validate(cfg, log)
    cache, folds = load_data(cfg)
    train_rows, val_rows = fold_indices(cache, folds, cfg.fold)
    channels = cache.channels(cfg.modalities)

    # the run folder: new, or the interrupted one given by --resume
    if cfg.resume:
        run_dir = Path(cfg.resume)
        resume = load_checkpoint(run_dir / "checkpoints" / LAST)
        if resume["config_identity"] != json.loads(json.dumps(cfg.identity())):
            diff = sorted(k for k, v in cfg.identity().items() if resume["config_identity"].get(k) != v)
            raise TrainingError(f"--resume {run_dir}: the run was made with another configuration (differs in {diff})")
    else:
        run_dir, resume = new_run_dir(cfg.output_dir, cfg.fold), None
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    handler = logging.FileHandler(run_dir / "logs" / f"train_{stamp}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:  # the run's log file gets INFO whatever the caller configured
        log.setLevel(logging.INFO)
    plots = PlotWriter(run_dir / "plots", "LDAM" if cfg.loss == "ldam" else "cross-entropy")
    try:
        return _train(cfg, cache, train_rows, val_rows, channels, run_dir, resume, plots, on_epoch_end)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"CUDA out of memory ({str(e).splitlines()[0]}). Use a smaller --batch-size (try 2 or 1) with "
            "--gradient-accumulation-steps to keep the effective batch, make sure AMP is on (--amp), and check that "
            "no other process holds GPU memory."
        ) from e
    except KeyboardInterrupt:
        log.warning("interrupted; resume with: gliograde train --fold %d --resume %s", cfg.fold, run_dir)
        raise
    finally:
        plots.close()
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _train(cfg, cache, train_rows, val_rows, channels, run_dir, resume, plots, on_epoch_end) -> RunResult:
    device = pick_device(cfg)
    dtype = amp_dtype(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # sampler and augmentation draws

    train_set = CacheDataset(cache, train_rows, channels)
    val_set = CacheDataset(cache, val_rows, channels)
    counts = np.bincount(train_set.labels, minlength=2).tolist()
    if len(train_set) < cfg.batch_size * cfg.grad_accum:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} x accumulation {cfg.grad_accum} exceeds the "
            f"{len(train_set)} training cases of fold {cfg.fold}"
        )
    train_loader, val_loader = make_loaders(
        train_set, val_set, cfg.batch_size, cfg.sampler, generator, cfg.num_workers, device.type == "cuda"
    )
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    log.info(
        "Fold %d: %d training cases (%d LGG, %d HGG), %d validation cases; modalities %s; %d optimizer "
        "steps per epoch on %s%s",
        cfg.fold,
        len(train_set),
        counts[0],
        counts[1],
        len(val_set),
        ",".join(cfg.modalities),
        steps_per_epoch,
        device,
        f" with {dtype} autocast" if dtype else "",
    )

    model = build_model(
        cfg.depth, len(channels), 2, cfg.shortcut, cfg.layout, cfg.dropout, None if resume else cfg.pretrained_path, log
    ).to(device)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0
        else None
    )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = make_loss(cfg.loss, counts, cfg.max_m, cfg.ldam_s).to(device)
    augment = AugmentParams(cfg.flip_prob, cfg.rotate_deg, cfg.scale_range, cfg.intensity_scale, cfg.intensity_shift)

    history: list[dict] = []
    best = {"auc": -math.inf, "f1": -math.inf, "epoch": 0}
    best_ema = dict(best)
    bad_epochs, start = 0, 1
    if resume:
        model.load_state_dict(resume["model_state_dict"])
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        scheduler.load_state_dict(resume["scheduler_state_dict"])
        scaler.load_state_dict(resume["scaler_state_dict"])
        if ema is not None:
            ema.load_state_dict(resume["ema_state_dict"])
        history, best, best_ema = resume["history"], resume["best"], resume["best_ema"]
        bad_epochs, start = resume["bad_epochs"], resume["epoch"] + 1
        set_rng_state(resume["rng_state"], generator)
        log.info("Resuming %s after epoch %d", run_dir, resume["epoch"])
    else:
        env = environment(device)
        write_json(
            run_dir / "config" / "config.json",
            {
                # the cache by absolute path, so that `evaluate` finds it from any working directory
                "config": {**cfg.to_dict(), "cache_dir": str(cache.path.resolve())},
                "environment": env,
                "seed": cfg.seed,
                "run_dir": str(run_dir),
            },
        )
        log.info("Run folder: %s", run_dir)

    def payload(epoch, state_dict, metrics, ema_weights=False) -> dict:
        return {
            "model_state_dict": state_dict,
            "epoch": epoch,
            "val_metrics": metrics,
            "is_ema": ema_weights,
            "config": cfg.to_dict(),
            "config_identity": cfg.identity(),
            "modalities": cfg.modalities,
            "size": cfg.size,
            "preprocess": cache.manifest["params"],  # how to prepare a new case for this model (predict)
            "arch": {
                "depth": cfg.depth,
                "layout": cfg.layout,
                "shortcut": cfg.shortcut,
                "in_channels": len(channels),
                "num_classes": 2,
            },
        }

    # ------------------------------------------------------------------------------------------ the epochs
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        drw = drw_active(cfg.loss, cfg.drw_start_epoch, epoch)
        loss_fn.weight = drw_weights(counts).to(device) if drw else None
        if drw and not drw_active(cfg.loss, cfg.drw_start_epoch, epoch - 1):
            log.info("DRW activated at epoch %d: class weights %s", epoch, loss_fn.weight.tolist())

        model.train()
        total, seen, micro_batches = 0.0, 0, steps_per_epoch * cfg.grad_accum
        bar = tqdm(train_loader, total=micro_batches, desc=f"epoch {epoch}", leave=False, disable=None)
        for i, (x, y) in enumerate(bar):
            if i >= micro_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.augment:
                x = augment_batch(x, augment, generator)
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                logits = model(x)
            loss = loss_fn(logits, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"non-finite training loss ({value}) at epoch {epoch}, step {i + 1}; stopped. "
                    f"Checkpoints of the previous epochs in {run_dir / 'checkpoints'} are intact. "
                    "Lower --lr, set --grad-clip, or check the input data."
                )
            scaler.scale(loss / cfg.grad_accum).backward()
            total, seen = total + value * len(y), seen + len(y)
            if (i + 1) % cfg.grad_accum == 0:
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
            bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        train_loss = total / max(seen, 1)

        val_loss, probs, labels = predict(model, val_loader, device, dtype, loss_fn)
        m = compute_metrics(labels, probs)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{
                f"val_{k}": m[k]
                for k in (
                    "auc",
                    "f1",
                    "accuracy",
                    "precision",
                    "recall",
                    "balanced_accuracy",
                    "sensitivity",
                    "specificity",
                    "fn",
                    "fp",
                )
            },
            "lr_backbone": optimizer.param_groups[0]["lr"],
            "lr_head": optimizer.param_groups[1]["lr"],
            "drw_active": drw,
        }
        is_best = improved(m["auc"], m["f1"], best, cfg.min_delta)
        if is_best:
            best = {"auc": m["auc"], "f1": m["f1"], "epoch": epoch}
            save_checkpoint(payload(epoch, model.state_dict(), m), run_dir / "checkpoints" / BEST)
        ema_best = False
        if ema is not None:
            ema_loss, ema_probs, ema_labels = predict(ema.module, val_loader, device, dtype, loss_fn)
            em = compute_metrics(ema_labels, ema_probs)
            record.update({"ema_val_loss": ema_loss, "ema_val_auc": em["auc"], "ema_val_f1": em["f1"]})
            ema_best = improved(em["auc"], em["f1"], best_ema, cfg.min_delta)
            if ema_best:
                best_ema = {"auc": em["auc"], "f1": em["f1"], "epoch": epoch}
                save_checkpoint(payload(epoch, ema.module.state_dict(), em, True), run_dir / "checkpoints" / BEST_EMA)
        bad_epochs = 0 if (is_best or ema_best) else bad_epochs + 1
        record.update({"is_best": is_best, "epoch_time_s": time.perf_counter() - t0})
        history.append(record)

        save_checkpoint(
            {
                **payload(epoch, model.state_dict(), m),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "scaler_state_dict": scaler.state_dict(),
                "ema_state_dict": ema.state_dict() if ema is not None else None,
                "history": history,
                "best": best,
                "best_ema": best_ema,
                "bad_epochs": bad_epochs,
                "rng_state": rng_state(generator),
            },
            run_dir / "checkpoints" / LAST,
        )
        write_json(
            run_dir / "metrics" / "metrics.json",
            {"status": "running", "fold": cfg.fold, "final": None, "history": history},
        )
        log.info(
            "Epoch %d/%d | train loss %.6f | val loss %.6f | AUC %.4f F1 %.4f acc %.4f | sens %.3f spec %.3f "
            "| FN %d FP %d | lr %.2e%s | %.1f s%s",
            epoch,
            cfg.epochs,
            train_loss,
            val_loss,
            m["auc"],
            m["f1"],
            m["accuracy"],
            m["sensitivity"],
            m["specificity"],
            m["fn"],
            m["fp"],
            record["lr_backbone"],
            f" | EMA AUC {record['ema_val_auc']:.4f}" if ema is not None else "",
            record["epoch_time_s"],
            " [best]" if is_best else "",
        )
        if is_best or epoch % cfg.plots_every == 0:
            plots.submit(history, labels, probs, m, f"_epoch_{epoch}", f"fold {cfg.fold}, epoch {epoch}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, run_dir)
        if epoch >= cfg.min_epochs and bad_epochs >= cfg.patience:
            log.info(
                "Early stopping at epoch %d: no improvement of validation AUC for %d epochs (best %.4f at epoch %d)",
                epoch,
                bad_epochs,
                best["auc"],
                best["epoch"],
            )
            break

    # ------------------------------------------------------------------------------------ final evaluation
    final = evaluate_checkpoint(run_dir / "checkpoints", cfg.ema_decay > 0, val_loader, device, dtype, loss_fn)
    probs, labels = final.pop("_probs"), final.pop("_labels")
    preds = (probs >= 0.5).astype(np.int64)
    out = run_dir / "predictions"
    np.save(out / "val_probs.npy", probs)
    np.save(out / "val_preds.npy", preds)
    np.save(out / "val_labels.npy", labels)
    write_json(out / "val_ids.json", [cache.ids[r] for r in val_rows])
    plots.submit(
        history,
        labels,
        probs,
        final,
        "",
        f"fold {cfg.fold}, final ({final['checkpoint']}, epoch {final['best_epoch']})",
    )
    plots.close()
    losses = {"train": summary([h["train_loss"] for h in history]), "val": summary([h["val_loss"] for h in history])}
    write_json(
        run_dir / "metrics" / "metrics.json",
        {"status": "complete", "fold": cfg.fold, "final": final, "history": history, "loss_summary": losses},
    )
    log.info(
        "Fold %d finished: AUC %.4f F1 %.4f accuracy %.4f (%s, epoch %d). Run folder: %s",
        cfg.fold,
        final["auc"],
        final["f1"],
        final["accuracy"],
        final["checkpoint"],
        final["best_epoch"],
        run_dir,
    )
    return RunResult(run_dir, final, history)
