"""Train one fold, top to bottom: `_train` is the set-up in named steps (data, parts, restore), then one epoch loop
(train, monitor, checkpoint, stop), then the final evaluation (`finish`).

With --selection inner (the default) the model trains on the fold's fit part, is monitored on its selection part
(early stopping, best/best_ema, the operating point), and the reported fold is scored once at the end; with outer
(the seeds') it trains on all training patients and is monitored on the reported fold.

Elsewhere, each in the module named for it: the run folder and its records (run_folder.py), the optimizer and the
schedule (optim.py), the generators of a resume (rng.py), the checkpoint policy (checkpoints.py), best/early stopping
(selection.py), EMA (ema.py), losses (losses.py), DDP and the batch plan (distributed.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from gliograde import runtime
from gliograde.checkpoints import LAST, CheckpointWriter, load_checkpoint, save_epoch
from gliograde.config import TrainConfig, check_config, with_split
from gliograde.data.augment import AugmentParams
from gliograde.data.data_path import make_fold_data, use_device_path
from gliograde.data.slices import check_bag_sizes
from gliograde.data.source import load_data
from gliograde.data.splits import fold_split
from gliograde.errors import GliogradeError
from gliograde.evaluation.calibration import fit_operating_point, seeds_point
from gliograde.evaluation.metrics import compute_metrics, monitored
from gliograde.evaluation.plots import PlotWriter, save_figure
from gliograde.evaluation.scoring import evaluate_checkpoint, score_loader
from gliograde.evaluation.stats import honest_statistics, reliability_figure
from gliograde.files import write_json
from gliograde.networks import build_for, describe_model, get_architecture
from gliograde.training import distributed, finetune
from gliograde.training.distributed import Dist
from gliograde.training.ema import EMA
from gliograde.training.losses import drw_active, drw_weights, get_loss, make_loss
from gliograde.training.optim import make_optimizer, make_scheduler
from gliograde.training.rng import rng_state, set_rng_state
from gliograde.training.run_folder import (
    mark_failed,
    new_run_dir,
    protocol_record,
    record_precision_change,
    write_run_config,
)
from gliograde.training.selection import Tracker
from gliograde.training.tracking import RunLogger

log = logging.getLogger("gliograde")
CHECK_EVERY = 25  # micro-batches between reads of the loss (the finite check and the progress bar)


class TrainingError(GliogradeError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    history: list[dict]


# ------------------------------------------------------------------------------------------------ set-up helpers
def check_finite(d: Dist, bad_step: int, epoch: int, run_dir: Path) -> None:
    """Stop every rank together when any rank saw a non-finite loss (bad_step: its first such micro-batch, 0: none).
    Nothing of this epoch has been checkpointed yet, so the previous epochs' checkpoints stay intact."""
    bad = int(distributed.max_value(d, float(bad_step)))
    if bad:
        raise TrainingError(
            f"non-finite training loss (nan or inf) at epoch {epoch}, step {bad}; stopped. "
            f"Checkpoints of the previous epochs in {run_dir / 'checkpoints'} are intact. "
            "Lower --lr, set --grad-clip, or check the input data."
        )


def summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else math.nan  # sample std, as everywhere in the reports
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "std": std}


# ------------------------------------------------------------------------------------------------- the fold
def train_fold(cfg: TrainConfig, on_epoch_end=None, run_dir: Path | None = None) -> RunResult:
    """Train one fold. With --multi-gpu (and no torchrun around it) the fold goes to `distributed.launch`, which
    runs this function once per GPU (or per --nproc gloo process); `run_dir` is then the folder it made."""
    check_config(cfg, log)
    request = "cuda" if cfg.gpu else cfg.device
    if cfg.multi_gpu and "WORLD_SIZE" not in os.environ:
        nproc = distributed.processes(cfg.nproc, request)
        if nproc >= 2:
            return _launch(cfg, nproc)
        log.warning("--multi-gpu: 1 process (%d GPU(s) visible), training on one device", torch.cuda.device_count())
    d = distributed.setup(request)
    try:
        return _fold(cfg, d, on_epoch_end, run_dir)
    finally:
        distributed.teardown(d)


def _launch(cfg: TrainConfig, nproc: int) -> RunResult:
    """DDP started by this command: the cache and the run folder are made here, once, then the ranks train."""
    cache, folds = load_data(cfg)
    cfg = with_split(dataclasses.replace(cfg, cache_dir=str(cache.path.resolve())), folds)
    # the batch plan checked here, before any process or folder exists: an impossible one is one line, not W tracebacks
    split = fold_split(cache, folds, cfg.fold, cfg.repeat)
    cuda = distributed.uses_cuda("cuda" if cfg.gpu else cfg.device)
    batch_plan(cfg, Dist(world=nproc), torch.device("cuda" if cuda else "cpu"),
               len(split.fit if cfg.selection == "inner" else split.train), None)  # fmt: skip
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg.output_dir, cfg.fold, cfg.repeat)
    try:
        distributed.launch(train_fold, cfg, nproc, run_dir)
    except Exception as e:  # a rank's exception arrives as the text of its traceback
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TrainingError(f"distributed training of fold {cfg.fold} failed: {last}. Run folder: {run_dir}") from e
    metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    return RunResult(run_dir, metrics["final"], metrics["history"])


def _fold(cfg: TrainConfig, d: Dist, on_epoch_end, run_dir: Path | None) -> RunResult:
    if not d.main:
        distributed.barrier(d)  # rank 0 prepares the cache and folds first; the others then only read them
    cache, folds = load_data(cfg)
    if d.main:
        distributed.barrier(d)
    cfg = with_split(cfg, folds)  # the persisted split is the truth: K, seeds, repeats, grouping, inner part
    split = fold_split(cache, folds, cfg.fold, cfg.repeat)
    channels = cache.channels(cfg.modalities)

    # the run folder: new, the interrupted one given by --resume, or the launcher's; rank 0 owns it
    resume = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        resume = load_checkpoint(run_dir / "checkpoints" / LAST)
        defaults = TrainConfig().identity()  # a key the run did not record yet had its default then
        recorded = {**defaults, **resume["config_identity"]}
        diff = sorted(k for k, v in json.loads(json.dumps(cfg.identity())).items() if recorded.get(k) != v)
        if diff:
            raise TrainingError(f"--resume {run_dir}: the run was made with another configuration (differs in {diff})")
    elif run_dir is None and d.main:
        run_dir = new_run_dir(cfg.output_dir, cfg.fold, cfg.repeat)
    run_dir = Path(distributed.broadcast(d, str(run_dir)))
    handler, plots, tracking, level = None, None, None, log.level
    if d.main:
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        handler = logging.FileHandler(run_dir / "logs" / f"train_{stamp}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
        if log.getEffectiveLevel() > logging.INFO:  # the run's log file gets INFO whatever the caller configured
            log.setLevel(logging.INFO)
        plots = PlotWriter(run_dir / "plots", get_loss(cfg.loss).display)
        name = f"fold_{cfg.fold}" + (f"_repeat_{cfg.repeat}" if cfg.repeat else "") + f"_{run_dir.name}"
        tracking = RunLogger(run_dir, cfg.tensorboard, cfg.mlflow, name, cfg.identity())
    status = "FAILED"
    try:
        result = _train(cfg, d, cache, folds, split, channels, run_dir, resume, plots, tracking, on_epoch_end)
        status = "FINISHED"
        return result
    except torch.cuda.OutOfMemoryError as e:
        error = TrainingError(f"fold {cfg.fold}: {runtime.oom_message(e, cfg.batch_size, cfg.grad_accum)}")
        mark_failed(d, run_dir, cfg, resume, error)
        raise error from e
    except Exception as e:
        mark_failed(d, run_dir, cfg, resume, e)
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        hint = os.environ.get("GLIOGRADE_RESUME_HINT")  # set by cv: re-run the cv command (training/cv.py)
        log.warning("interrupted; %s", hint or f"resume with: gliograde train --fold {cfg.fold} --resume {run_dir}")
        raise
    finally:
        if tracking is not None:
            tracking.close(status)
        if plots is not None:
            plots.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)


def _train(cfg, d, cache, folds_doc, split, channels, run_dir, resume, plots, tracking, on_epoch_end) -> RunResult:
    # ------------------------------------------------------------------------------------------------ set-up
    device = runtime.pick_device("cuda" if cfg.gpu else cfg.device, d.local_rank)
    runtime.configure_backends(device, cfg.tf32)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # sampling and augmentation, identical on every rank
    train_rows, monitor_rows = (split.fit, split.select) if cfg.selection == "inner" else (split.train, split.val)
    counts = np.bincount(cache.labels[train_rows], minlength=2).tolist()
    plan = batch_plan(cfg, d, device, len(train_rows), resume)
    data = deliver(cfg, d, cache, split, train_rows, monitor_rows, channels, device, generator, plan, counts)
    p = build_parts(cfg, d, device, channels, plan, data.steps_per_epoch, counts, resume, data.classes[1])
    history, tracker, start = restore(cfg, d, p, resume, generator, device, run_dir)
    if resume is None and d.main:
        write_run_config(run_dir, cfg, cache, device, p.precision, plan, data.path, split, folds_doc)
    writer = CheckpointWriter() if d.main else None
    # what every checkpoint records to be rebuilt and read: the network's description, the loss's logit scale
    described = {"arch": describe_model(cfg, len(channels)), "logit_scale": p.scale,
                 "preprocess": cache.manifest["params"]}  # fmt: skip

    # ------------------------------------------------------------------------------------------------ the epochs
    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            drw = set_drw(cfg, p.loss_fn, counts, epoch, device)
            finetune.enter_epoch(p.model, cfg, epoch, log)  # --freeze-epochs: frozen until N, then unfrozen (logged)
            train_loss, throughput = train_epoch(
                cfg, d, p.net, p.model, p.ema, data.stream, p.optimizer, p.scheduler, p.scaler, p.loss_fn,
                p.precision.dtype, p.channels_last, device, epoch, run_dir, plan.accumulation,
            )  # fmt: skip
            t_val = time.perf_counter()
            val_loss, m, em, probs, labels = monitor(d, p, data, device)
            is_best, ema_best = tracker.update(epoch, m, em)  # every rank holds the same metrics: the same decisions
            now = time.perf_counter()
            record = epoch_record(epoch, train_loss, val_loss, m, em, p.optimizer, drw, throughput)
            record.update({"is_best": is_best, "epoch_time_s": now - t0, "val_time_s": now - t_val})
            history.append(record)
            rng = rng_state(generator, d, device)  # a collective: on every rank
            if d.main:  # the checkpoint policy: best.pt / best_ema.pt when they improve, last.pt every epoch
                resume_state = {
                    "optimizer_state_dict": p.optimizer.state_dict(),
                    "scheduler_state_dict": p.scheduler.state_dict(),
                    "scaler_state_dict": p.scaler.state_dict(),
                    "ema_state_dict": p.ema.state_dict() if p.ema is not None else None,
                    "history": history,
                    **tracker.state(),
                    "rng_state": rng,
                    "world": d.world,
                    "batch_plan": plan.to_dict(),
                    "precision": p.precision.to_dict(),  # reused by --resume, whatever the stack decides then
                }
                save_epoch(writer, run_dir / "checkpoints", cfg, described, epoch, p.model, p.ema, (m, em),
                           (is_best, ema_best), resume_state)  # fmt: skip
                write_json(
                    run_dir / "metrics" / "metrics.json",
                    {"status": "running", "fold": cfg.fold, "repeat": cfg.repeat, "final": None, "history": history},
                )
            log_epoch(cfg, record, m, is_best, p.ema is not None)
            if tracking is not None:
                tracking.log_epoch(record)
            if plots is not None and cfg.plots_every and (is_best or epoch % cfg.plots_every == 0):
                plots.submit(history, labels, probs, m, f"_epoch_{epoch}", f"fold {cfg.fold}, epoch {epoch}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, run_dir)
            if tracker.should_stop(epoch, cfg.min_epochs, cfg.patience):
                best = tracker.best
                log.info("Early stopping at epoch %d: no improvement of the monitored AUC for %d epochs (best %.4f "
                         "at epoch %d)", epoch, tracker.bad_epochs, best["auc"], best["epoch"])  # fmt: skip
                break
    finally:
        if writer is not None:
            writer.close()  # every checkpoint of a finished epoch is on disk, also when interrupted

    if not d.main:
        return RunResult(run_dir, {}, history)  # rank 0 evaluates and writes the results
    if get_loss(cfg.loss).drw:  # the final loss unweighted, as `evaluate` computes it (DRW is a training device)
        p.loss_fn.weight = None
    return finish(cfg, cache, split, data, device, p.precision, p.loss_fn, counts, history, run_dir, plots, tracking)


# ------------------------------------------------------------------------------------------- set-up, in steps
@dataclass
class Parts:
    """What trains: the model (and its DDP / compiled wrapper `net`), EMA, precision, optimizer, schedule, scaler,
    loss. The checkpoints hold `model`, never the wrapper."""

    model: torch.nn.Module
    net: torch.nn.Module
    ema: EMA | None
    precision: runtime.Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    scale: float
    channels_last: bool


def deliver(cfg, d, cache, split, train_rows, monitor_rows, channels, device, generator, plan, counts):
    """The fold's data (data/data_path.py), after the MIL bag check; logs what the fold trains on."""
    if get_architecture(cfg.model).slice_attention:  # a bag of slices per volume: each must hold mil_k of them
        try:
            check_bag_sizes(cache, np.concatenate([split.train, split.val]), channels, cfg.mil_k, log)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    augment = AugmentParams.from_config(cfg)  # None with --no-augment
    data = make_fold_data(
        cache, train_rows, {"monitor": monitor_rows, "final": split.val}, channels, device,
        on_device=use_device_path(cfg.data_path, device, d.active), batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, sampler=cfg.sampler, generator=generator, augment=augment,
        num_workers=cfg.num_workers, rank=d.rank, world=d.world, micro_batch=plan.micro_batch, per_gpu=plan.per_gpu,
    )  # fmt: skip
    inner = cfg.selection == "inner"
    log.info(
        "Fold %d%s: training on %d cases (%d %s, %d %s); %s on %d %s cases; %d reported cases scored once at the "
        "end; modalities %s; %d optimizer steps per epoch on %s%s",
        cfg.fold, f" (repeat {cfg.repeat})" if cfg.repeats and cfg.repeats > 1 else "", len(train_rows), counts[0],
        cache.classes[0], counts[1], cache.classes[1], "early stopping, checkpoint, threshold and calibration chosen",
        len(monitor_rows),
        "selection-part" if inner else "reported-fold (the seeds' outer protocol: optimistic)", len(split.val),
        ",".join(cfg.modalities), data.steps_per_epoch, device,
        f" x {d.world} processes (DDP: global batch {plan.global_batch}, {plan.accumulation} micro-batch(es) of "
        f"{plan.micro_batch} per process per step)" if d.active else "",
    )  # fmt: skip
    if plan.note:
        log.warning("DDP: %s", plan.note)
    return data


def build_parts(cfg, d, device, channels, plan, steps_per_epoch, counts, resume, positive="HGG") -> Parts:
    """The model (pretrained weights for a new run; channels_last_3d on a GPU for the networks whose convolutions
    it speeds, as the table of architectures says; SyncBatchNorm where the plan says), EMA, the precision decided
    once, optimizer, schedule, scaler and loss."""
    channels_last = get_architecture(cfg.model).channels_last and (
        cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    )
    model = build_for(cfg, len(channels), None if resume else cfg.pretrained_path, log).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if d.active and plan.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    finetune.prepare(model, cfg, log)  # --probe: the backbone frozen before EMA, the optimizer and DDP see it
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: a stream of its own per rank, not a replay of the init
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    precision = run_precision(cfg, d, device, resume)  # decided once (rank 0), or the resumed run's own
    log.info("Precision: %s", precision.reason)
    optimizer = make_optimizer(model, cfg)
    net = model
    if d.active:  # gradients all-reduced across the ranks
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **finetune.ddp_options(cfg))  # fmt: skip
    if cfg.compile:
        net = torch.compile(net)
    loss = get_loss(cfg.loss)  # the table of losses (training/losses.py)
    scale = float(loss.logit_scale(cfg))
    log.info("Loss: %s; P(%s) = softmax(%g x logits)", loss.display, positive, scale)
    return Parts(
        model, net, ema, precision, optimizer, make_scheduler(optimizer, cfg, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=precision.needs_scaler), make_loss(cfg, counts).to(device), scale,
        channels_last,
    )  # fmt: skip


def restore(cfg, d, p: Parts, resume, generator, device, run_dir) -> tuple[list[dict], Tracker, int]:
    """(history, tracker, first epoch): a new run's, or an interrupted run's from its last.pt (weights, optimizer,
    schedule, scaler of an fp16 run, EMA, history, best/patience, generators)."""
    if resume is None:
        return [], Tracker(cfg.min_delta), 1
    # the model's state loaded into `model`, which DDP / torch.compile wrap by reference
    p.model.load_state_dict(resume["model_state_dict"])
    p.optimizer.load_state_dict(resume["optimizer_state_dict"])
    p.scheduler.load_state_dict(resume["scheduler_state_dict"])
    if p.precision.needs_scaler and resume.get("scaler_state_dict"):  # a GradScaler of an fp16 run, not a fresh one
        p.scaler.load_state_dict(resume["scaler_state_dict"])
    if p.ema is not None:
        p.ema.load_state_dict(resume["ema_state_dict"])
    tracker, start = Tracker.from_checkpoint(resume, cfg.min_delta), resume["epoch"] + 1
    note = set_rng_state(resume["rng_state"], generator, d, device)
    if note:
        log.warning("--resume: %s", note)
    log.info("Resuming %s after epoch %d", run_dir, resume["epoch"])
    before = (resume.get("precision") or {}).get("name")
    if d.main and before is not None and before != p.precision.name:  # config.json says when it changed
        record_precision_change(run_dir, resume["epoch"], before, p.precision)
    if tracker.should_stop(resume["epoch"], cfg.min_epochs, cfg.patience):  # it had stopped; only finish
        log.info("The run had stopped early at epoch %d; scoring it", resume["epoch"])
        start = cfg.epochs + 1
    return resume["history"], tracker, start


def set_drw(cfg, loss_fn, counts, epoch: int, device) -> bool:
    """Deferred re-weighting of a loss whose spec takes it (LDAM): the class weights of this epoch (None before
    --drw-start-epoch). Another loss's module is left as it is."""
    drw = drw_active(cfg.loss, cfg.drw_start_epoch, epoch)
    if get_loss(cfg.loss).drw:
        loss_fn.weight = drw_weights(counts).to(device) if drw else None
    if drw and not drw_active(cfg.loss, cfg.drw_start_epoch, epoch - 1):
        log.info("DRW activated at epoch %d: class weights %s", epoch, loss_fn.weight.tolist())
    return drw


def monitor(d, p: Parts, data, device):
    """The monitored set scored with the raw weights and the EMA weights: (loss, metrics, EMA metrics or None, P(HGG),
    labels). Each rank scores its share (an empty one too) with rank 0's BatchNorm statistics; all get all."""
    distributed.sync_buffers(d, p.model)  # score (and save) rank 0's BatchNorm statistics on every rank
    if p.ema is not None:
        distributed.sync_buffers(d, p.ema)

    def scored(m):
        loss, probs, labels = score_loader(m, data.batches("monitor"), device, p.precision.dtype, p.loss_fn, p.scale,
                                      allow_empty=d.active)  # fmt: skip
        return distributed.gather_predictions(d, loss, probs, labels)

    val_loss, probs, labels = scored(p.model)
    em = None
    if p.ema is not None:
        ema_loss, ema_probs, ema_labels = scored(p.ema.module)
        em = {**compute_metrics(ema_labels, ema_probs, classes=data.classes), "loss": ema_loss}
    return val_loss, compute_metrics(labels, probs, classes=data.classes), em, probs, labels


def train_epoch(
    cfg, d, net, model, ema, stream, optimizer, scheduler, scaler, loss_fn, dtype, channels_last, device, epoch,
    run_dir, accumulation: int,
) -> tuple[float, dict]:
    """One epoch of optimizer steps; returns the mean training loss and the epoch's throughput figures.
    `accumulation`: this process's micro-batches per optimizer step (the batch plan's; DDP averages over ranks).

    The loss is summed on the device and read every CHECK_EVERY micro-batches and at the end: no host
    synchronisation per micro-batch. bad_step holds the first micro-batch whose loss was not finite (0: none)."""
    net.train()
    finetune.hold_frozen(model, cfg, epoch)  # a frozen backbone's BatchNorm statistics do not drift
    resident = None
    if device.type == "cuda":  # what stays allocated between steps: volumes on the device, weights, optimizer state
        resident = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    seen, waited, t_train = 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(stream), desc=f"epoch {epoch}", leave=False, disable=None if d.main else True)
    batches, i = iter(stream), -1
    while True:
        t_wait = time.perf_counter()  # host time blocked on the data path, not on the GPU
        x, y = next(batches, (None, None))
        waited += time.perf_counter() - t_wait
        if x is None:
            break
        i += 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        step_ends = (i + 1) % accumulation == 0
        with net.no_sync() if d.active and not step_ends else nullcontext():  # all-reduce once per step
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                logits = net(x)
            loss = loss_fn(logits, y)
            scaler.scale(loss / accumulation).backward()
        value = loss.detach()
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(value), i + 1, bad_step)
        total += value.double() * len(y)
        seen += len(y)
        if step_ends:
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)  # fp16 only: the GradScaler reads its inf check here (a sync per step)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        bar.update()
        if (i + 1) % CHECK_EVERY == 0:
            check_finite(d, int(bad_step), epoch, run_dir)
            bar.set_postfix(loss=f"{float(total) / seen:.4f}")
    bar.close()
    check_finite(d, int(bad_step), epoch, run_dir)
    train_time = time.perf_counter() - t_train
    throughput = {
        "train_volumes_per_s": seen * d.world / train_time,
        "data_wait_fraction": waited / train_time,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "resident_gpu_memory_gib": resident,
        "train_time_s": train_time,
    }
    return distributed.mean(d, float(total) / max(seen, 1)), throughput


def epoch_record(epoch, train_loss, val_loss, m, em, optimizer, drw, throughput) -> dict:
    """One epoch of metrics.json's history. `val_*` are the monitored set's (the selection part with inner)."""
    record = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **{f"val_{k}": m[k] for k in monitored()},  # the table of metrics (evaluation/metrics.py)
        **dict(zip(("lr_backbone", "lr_head"), finetune.group_lrs(optimizer), strict=True)),  # backbone 0: frozen
        "drw_active": drw,
        **throughput,
    }
    if em is not None:
        record.update({"ema_val_loss": em["loss"], "ema_val_auc": em["auc"], "ema_val_f1": em["f1"]})
    return record


def log_epoch(cfg, r: dict, m: dict, is_best: bool, ema: bool) -> None:
    log.info(
        "Epoch %d/%d | train loss %.6f | val loss %.6f | AUC %.4f F1 %.4f acc %.4f | sens %.3f spec %.3f "
        "| FN %d FP %d | lr %.2e%s | %.1f s%s",
        r["epoch"],
        cfg.epochs,
        r["train_loss"],
        r["val_loss"],
        m["auc"],
        m["f1"],
        m["accuracy"],
        m["sensitivity"],
        m["specificity"],
        m["fn"],
        m["fp"],
        r["lr_backbone"],
        f" | EMA AUC {r['ema_val_auc']:.4f}" if ema else "",
        r["epoch_time_s"],
        " [best]" if is_best else "",
    )


def finish(
    cfg, cache, split, data, device, precision, loss_fn, counts, history, run_dir, plots, tracking
) -> RunResult:
    """The reported fold scored once with the selected checkpoint at the operating point (fitted on the selection
    part with inner), its predictions, figures and metrics.json."""
    inner = cfg.selection == "inner"

    def fit_point(labels, raw):
        return fit_operating_point(
            labels, raw, counts, cfg.sampler, specificity=cfg.threshold_at_specificity, temperature=cfg.temperature
        )

    final = evaluate_checkpoint(
        run_dir / "checkpoints",
        cfg.ema_decay > 0,
        data.batches("final", shard=False),
        device,
        precision,  # training's decision, taken once
        loss_fn,
        point=None if inner else seeds_point(counts),
        select_loader=data.batches("monitor", shard=False) if inner else None,
        fit_point=fit_point if inner else None,
        expected=cfg.model,
        classes=cache.classes,
    )
    probs, raw, labels = final.pop("_probs"), final.pop("_raw_probs"), final.pop("_labels")
    bags = final.pop("_attention")
    final.update(protocol_record(cfg, split))
    final.update(honest_statistics(labels, probs, final["threshold"]))
    out = run_dir / "predictions"
    np.save(out / "val_probs.npy", probs)
    np.save(out / "val_probs_raw.npy", raw)
    np.save(out / "val_preds.npy", (probs >= final["threshold"]).astype(np.int64))
    np.save(out / "val_labels.npy", labels)
    if bags is not None:  # MIL: each case's selected slices and their attention weights, to audit
        np.save(out / "val_slices.npy", bags[0])
        np.save(out / "val_attention.npy", bags[1])
    write_json(out / "val_ids.json", [cache.ids[r] for r in split.val])
    title = f"fold {cfg.fold}, final ({final['checkpoint']}, epoch {final['best_epoch']})"
    plots.submit(history, labels, probs, final, "", title)
    plots.close()
    curve = {"reported fold": final["calibration"]["reliability"]}
    save_figure(reliability_figure(curve, f"{title}: reliability"), run_dir / "plots" / "reliability.png")
    losses = {"train": summary([h["train_loss"] for h in history]), "val": summary([h["val_loss"] for h in history])}
    write_json(
        run_dir / "metrics" / "metrics.json",
        {
            "status": "complete",
            "fold": cfg.fold,
            "repeat": cfg.repeat,
            "selection": final["selection"],
            "final": final,
            "history": history,
            "loss_summary": losses,
        },
    )
    if tracking is not None:
        figures = sorted(p for p in (run_dir / "plots").glob("*.png") if "_epoch_" not in p.name)
        tracking.log_final(
            final, figures, [run_dir / "metrics" / "metrics.json", run_dir / "config", run_dir / "plots"]
        )
    log.info(
        "Fold %d finished: AUC %.4f F1 %.4f accuracy %.4f at threshold %.3f (%s; %s, epoch %d). Run folder: %s",
        cfg.fold,
        final["auc"],
        final["f1"],
        final["accuracy"],
        final["threshold"],
        final["selection"]["label"],
        final["checkpoint"],
        final["best_epoch"],
        run_dir,
    )
    return RunResult(run_dir, final, history)


def batch_plan(cfg, d: Dist, device: torch.device, n_train: int, resume: dict | None) -> distributed.BatchPlan:
    """The batch plan of this run (`distributed.plan_batch`): the configured global batch split over the ranks, or
    --batch-per-gpu. Refused in one line where it cannot be held: a share W does not divide, more volumes per step than
    training cases, or a resume whose global batch would differ (the schedule and the sampled stream would)."""
    if cfg.sync_bn and d.active and device.type != "cuda":
        log.warning("--sync-bn: SyncBatchNorm needs GPUs; ignored on the CPU")
    try:
        plan = distributed.plan_batch(
            cfg.batch_size, cfg.grad_accum, d.world, per_gpu=cfg.batch_per_gpu,
            sync_bn=cfg.sync_bn and device.type == "cuda", cuda=device.type == "cuda",
            batchnorm_per_volume=get_architecture(cfg.model).batchnorm_per_volume,
        )  # fmt: skip
    except distributed.DistributedError as e:
        raise TrainingError(f"fold {cfg.fold}: {e}") from None
    if n_train < plan.global_batch:
        raise TrainingError(
            f"fold {cfg.fold}: a global batch of {plan.global_batch} (--batch-size {cfg.batch_size} x accumulation "
            f"{cfg.grad_accum}{f' x {d.world} processes' if plan.per_gpu else ''}) exceeds the {n_train} training cases"
        )
    if resume is not None:
        before = (resume.get("batch_plan") or {}).get("global")
        if before is None:  # a run saved before the plan: B x A x its number of processes
            before = cfg.batch_size * cfg.grad_accum * resume.get("world", 1)
        if before != plan.global_batch:
            raise TrainingError(
                f"--resume: the run trained with a global batch of {before} ({resume.get('world', 1)} process(es)); "
                f"this would be {plan.global_batch} ({d.world}): the learning-rate schedule and the sampled stream "
                "would change. Resume with the same global batch"
            )
    if plan.per_gpu and d.active:
        log.warning(
            "--batch-per-gpu: the global batch is %d (%d x %d accumulation x %d processes); the learning rate is not "
            "rescaled (the linear scaling rule of Goyal et al. 2017 would use --lr x %d)",
            plan.global_batch, cfg.batch_size, cfg.grad_accum, d.world, d.world,
        )  # fmt: skip
    return plan


def run_precision(cfg, d: Dist, device: torch.device, resume: dict | None) -> runtime.Precision:
    """The run's precision, decided once on rank 0 and broadcast (so that the ranks never disagree, and a refusal
    stops every rank, not only rank 0). A resumed run keeps the precision recorded in its last.pt; an explicit other
    --precision is honoured (with a fresh GradScaler) and said."""
    outcome = None
    if d.main:
        try:
            outcome = {"precision": _precision_of(cfg, device, resume).to_dict()}
        except runtime.DeviceError as e:
            outcome = {"error": str(e)}
    outcome = distributed.broadcast(d, outcome)
    if "error" in outcome:
        raise runtime.DeviceError(outcome["error"])
    return runtime.Precision.from_dict(outcome["precision"])


def _precision_of(cfg, device, resume) -> runtime.Precision:
    stored = (resume or {}).get("precision")
    if stored is None:
        return runtime.decide_precision(cfg.precision, cfg.amp, device)
    kept = runtime.Precision.from_dict(stored)
    if (cfg.precision == "auto" and cfg.amp is None) or cfg.precision == kept.name:
        return dataclasses.replace(kept, reason=f"{kept.reason} (the run's own, kept on resume)")
    asked = runtime.decide_precision(cfg.precision, cfg.amp, device)
    if asked.name != kept.name:
        log.warning(
            "--resume: the run trained in %s until epoch %d; it goes on in %s as asked%s",
            kept.name, resume["epoch"], asked.name, " (with a fresh GradScaler)" if asked.needs_scaler else "",
        )  # fmt: skip
        asked = dataclasses.replace(
            asked, reason=f"{asked.reason}; resumed after epoch {resume['epoch']} (trained in {kept.name} until then)"
        )
    return asked


