"""`gliograde <command>`: the one entry point. Each command is a small function over the library.

Each command imports what it needs when it runs, never at the top of this module: `gliograde predict --onnx`
must not import torch, the networks or the training code (tests/test_export.py runs it under -X importtime)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from gliograde import __version__
from gliograde.errors import GliogradeError

log = logging.getLogger("gliograde")


# ---------------------------------------------------------------------------------------------- synth
def _add_synth(sub):
    p = sub.add_parser("synth", help="write a synthetic BraTS-like data set as NIfTI in the BraTS 2018 layout")
    p.add_argument("--out", required=True, help="folder to create (HGG/ and LGG/ inside)")
    p.add_argument("--cases", type=int, default=40, help="number of cases (default 40)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[240, 240, 155],
        metavar=("X", "Y", "Z"),
        help="volume shape (default 240 240 155, the BraTS grid)",
    )
    p.add_argument("--hgg-fraction", type=float, default=210 / 285, help="share of HGG cases (default 210/285)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument(
        "--signal",
        choices=["grade", "none", "site"],
        default="grade",
        help="what predicts the grade: the tumour's look (default), nothing (permuted grades), or the site only "
        "(single-grade sites with a scanner imprint): sets whose honest answer is known",
    )
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> None:
    from gliograde.data.synthetic import synthesize

    start = time.perf_counter()
    out, reused = synthesize(
        args.out, args.cases, args.shape, args.seed, args.hgg_fraction, args.workers, signal=args.signal
    )
    if reused:
        log.info("%s already holds this synthetic set; nothing written", out)
    else:
        log.info("wrote %d synthetic cases to %s in %.1f s", args.cases, out, time.perf_counter() - start)


# -------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub):
    p = sub.add_parser("prepare", help="preprocess a BraTS folder into a volume cache and write the folds")
    p.add_argument(
        "--data-root",
        "--data_root",
        dest="data_root",
        default=None,
        help="BraTS training folder (default: $GLIOGRADE_DATA or data/MICCAI_BraTS_2018_Data_Training)",
    )
    p.add_argument("--out", default=None, help="cache folder (default: cache/<data root name>-s<size>)")
    p.add_argument("--size", type=int, default=128, help="edge of the cubic volumes (default 128)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument(
        "--skip-incomplete",
        action="store_true",
        help="leave out cases with missing or unreadable files (listed in the report) instead of failing",
    )
    add_split_flags(p, argparse.SUPPRESS)
    p.add_argument("--seed", dest="split_seed", type=int, default=argparse.SUPPRESS, help="alias of --split-seed")
    p.set_defaults(func=cmd_prepare)


def add_split_flags(p: argparse.ArgumentParser, default) -> None:
    """The split, the same flags on prepare, train and cv. Not given: the saved folds.json decides (the defaults
    when none exists yet: 5 folds, seed 42, 1 repeat, no grouping, a 20 % inner selection part)."""
    p.add_argument("--folds", "--num-folds", "--k", dest="folds", type=fold_count, default=default,
                   help="number of folds K (default: the saved split's, else 5)")  # fmt: skip
    p.add_argument("--split-seed", "--split_seed", dest="split_seed", type=int, default=default,
                   help="seed of the fold split (default: the saved split's, else 42)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=default, help="repeated CV: R fold sets, seeds S..S+R-1")
    p.add_argument("--group-by", "--group_by", dest="group_by", choices=["site"], default=default,
                   help="no acquisition site in two folds (StratifiedGroupKFold)")  # fmt: skip
    p.add_argument("--leave-site-out", "--leave_site_out", dest="leave_site_out", action="store_const", const=True,
                   default=default, help="one fold per site")  # fmt: skip
    p.add_argument("--inner-fraction", "--inner_fraction", dest="inner_fraction", type=float, default=default,
                   help="share of each fold's training patients set aside for selection (default 0.2)")  # fmt: skip


def fold_count(value: str) -> int:
    """--folds is K in every command; a fold list (cv) is --only."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of folds: --folds is K in every command; pick folds with --only {value}"
        ) from None


def prepare_and_split(data_root, out, size, workers, skip_incomplete, spec=None):
    """prepare + folds, logging what happened; returns (cache, folds)."""
    from gliograde.data.cache import open_cache, prepare_cache
    from gliograde.data.splits import describe, folds_for_cache

    result = prepare_cache(data_root, out, size=size, workers=workers, skip_incomplete=skip_incomplete)
    log.info(result.discovery.report())
    if result.reused:
        log.info("cache %s is up to date (same parameters, unchanged sources): reused", result.path)
    else:
        log.info(
            "prepared %d cases in %.1f s (%.2f cases/s) -> %s",
            result.n_cases,
            result.seconds,
            result.cases_per_s,
            result.path,
        )
        for cid, why in result.failed.items():
            log.warning("skipped %s: %s", cid, why)
    cache = open_cache(result.path)
    folds = folds_for_cache(cache, spec)
    log.info("folds: %s -> %s", describe(folds), cache.path / "folds.json")
    return cache, folds


def cmd_prepare(args) -> None:
    from gliograde.data.brats import resolve_data_root
    from gliograde.data.splits import SplitSpec

    spec = SplitSpec(*(getattr(args, k, None) for k in SPLIT_FIELDS))
    prepare_and_split(resolve_data_root(args.data_root), args.out, args.size, args.workers, args.skip_incomplete, spec)


SPLIT_FIELDS = ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction")


# ----------------------------------------------------------------------------------------- model-info
def _add_model_info(sub):
    p = sub.add_parser("model-info", help="parameters, GFLOPs per volume and activation memory of a ResNet-3D")
    p.add_argument("--depth", type=int, default=50, choices=[10, 18, 34, 50, 101, 152, 200])
    p.add_argument("--layout", default="strided", choices=["strided", "medicalnet"])
    p.add_argument("--shortcut", default="B", choices=["A", "B"])
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=2)
    p.set_defaults(func=cmd_model_info)


def cmd_model_info(args) -> None:
    import torch

    from gliograde.networks.profile import profile_model
    from gliograde.networks.resnet3d import ResNet3D

    model = ResNet3D(args.depth, args.in_channels, args.num_classes, args.shortcut, args.layout)
    fp32 = profile_model(model, args.in_channels, args.size)
    bf16 = profile_model(model, args.in_channels, args.size, torch.bfloat16)
    rows = [
        ("network", model.describe()),
        ("input", f"{args.in_channels} x {args.size}^3"),
        ("parameters", f"{fp32.params / 1e6:.2f} M"),
        ("layer4 feature map", " x ".join(map(str, fp32.feature_map))),
        ("forward", f"{fp32.gflop_forward:.1f} GFLOP per volume"),
        ("forward + backward", f"{fp32.gflop_train:.1f} GFLOP per volume"),
        (
            "activations saved for backward",
            f"{fp32.activation_bytes / 2**30:.2f} GiB fp32, {bf16.activation_bytes / 2**30:.2f} GiB bf16 per volume",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# ---------------------------------------------------------------------------------------------- train
def add_train_flags(p: argparse.ArgumentParser, for_cv: bool = False) -> None:
    """Every flag of the seeds, in both spellings where they use both. Flags not given keep the preset's value.

    --folds is K everywhere; `cv` picks folds with --only (0-4, 0,2); --fold and --resume do not apply to `cv`."""
    S = argparse.SUPPRESS

    _protocol_flags(_flagger(p.add_argument_group("protocol"), S), for_cv)
    add_split_flags(p, S)
    _optimisation_flags(_flagger(p.add_argument_group("optimisation"), S))
    _model_flags(_flagger(p.add_argument_group("model"), S))
    _execution_flags(_flagger(p.add_argument_group("execution (device, precision, DDP, speed)"), S))
    _file_flags(_flagger(p.add_argument_group("files and tracking"), S), for_cv)
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the resolved configuration and what would run, then exit",
    )


def _flagger(group, default):
    """`flag(*names, **kw)`: an option of `group` whose default is `default` (SUPPRESS: a flag not given keeps the
    preset's value)."""

    def flag(*names, **kw):
        group.add_argument(*names, default=default, **kw)

    return flag


def _protocol_flags(flag, for_cv: bool = False) -> None:
    """The preset, the split and the selection protocol."""
    flag("--preset", choices=["final", "ldam-drw", "cpu-demo"], help="configuration preset (default: final)")
    flag("--config", help="a YAML file of configuration keys: preset < file < flags")
    if not for_cv:
        flag("--fold", type=int, help="fold to train, 0..K-1 (default 0)")
        flag("--repeat", type=int, help="repeat of the split the fold belongs to (default 0)")
    flag(
        "--selection",
        choices=["inner", "outer"],
        help="inner (default): early stopping, checkpoint, threshold and calibration chosen on a selection part of "
        "the training patients, the fold scored once; outer: chosen on the reported fold (the seeds'; optimistic)",
    )
    flag(
        "--threshold-at-specificity",
        dest="threshold_at_specificity",
        type=float,
        help="the lowest threshold reaching this specificity on the selection part (default: Youden's J)",
    )
    flag("--temperature", action="store_const", const=True, help="fit a temperature on the selection part")
    flag(
        "--modality", "--modalities", dest="modalities", help="one modality, 'all', or a comma list (t1,t1ce,t2,flair)"
    )


def _optimisation_flags(flag) -> None:
    """Epochs, batch, optimizer, schedule, loss, sampling, early stopping."""
    flag("--epochs", type=int)
    flag("--batch-size", "--batch_size", dest="batch_size", type=int)
    flag("--gradient-accumulation-steps", "--gradient_accumulation_steps", "--grad-accum", dest="grad_accum", type=int)
    flag("--lr", type=float, help="backbone learning rate")
    flag(
        "--classifier-lr-mult",
        "--classifier_lr_mult",
        dest="classifier_lr_mult",
        type=float,
        help="classifier lr = lr x this (final policy: 2)",
    )
    flag("--weight-decay", "--weight_decay", dest="weight_decay", type=float)
    flag("--optimizer", type=str.lower, choices=["adam", "adamw", "sgd"])
    flag("--scheduler", type=str.lower, choices=["cosine", "step", "none"])
    flag("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=int)
    flag("--grad-clip", "--grad_clip", dest="grad_clip", type=float, help="max gradient norm (0 = off)")
    flag("--loss", type=str.lower, choices=["ce", "ldam"], help="ce or ldam (any case)")
    flag("--sampler", type=str.lower, choices=["weighted", "shuffle"])
    flag("--max-m", "--max_m", dest="max_m", type=float, help="LDAM largest margin")
    flag("--ldam-s", "--ldam_s", "--s", dest="ldam_s", type=float, help="LDAM scale s")
    flag("--drw-start-epoch", "--drw_start_epoch", dest="drw_start_epoch", type=int)
    flag("--ema-decay", "--ema_decay", dest="ema_decay", type=float, help="EMA of the weights (0 = off)")
    flag("--early-stopping", "--early_stopping", "--patience", dest="patience", type=int, help="patience in epochs")
    flag("--min-epochs", "--min_epochs", dest="min_epochs", type=int)
    flag("--min-delta", "--min_delta", dest="min_delta", type=float)
    flag("--dropout", type=float)


def _model_flags(flag) -> None:
    """The network (3D ResNet or 2D MIL), its input and its pretrained weights."""
    flag("--model", choices=["resnet3d", "mil2d"], help="resnet3d (default) or mil2d: 2D MIL over axial slices")
    flag("--mil-k", "--mil_k", dest="mil_k", type=int, help="mil2d: entropy-selected axial slices per case (16)")
    flag("--mil-pooling", dest="mil_pooling", choices=["attention", "mean", "max"], help="mil2d: bag pooling")
    flag("--mil-min-gap", dest="mil_min_gap", type=int, help="mil2d: minimum distance between selected slices")
    flag(
        "--mil-entropy-modality",
        dest="mil_entropy_modality",
        choices=["t1", "t1ce", "t2", "flair"],
        help="mil2d: rank slices on this modality's entropy (default: the mean over the input modalities)",
    )
    flag("--depth", type=int, choices=[10, 18, 34, 50, 101, 152, 200], help="ResNet depth (mil2d: 18 or 34)")
    flag("--layout", choices=["strided", "medicalnet"])
    flag("--shortcut", choices=["A", "B"])
    flag("--size", type=int, help="edge of the cubic input volumes (default 128)")
    flag("--pretrained-path", "--pretrained_path", dest="pretrained_path", help="MedicalNet .pth file")
    flag("--no-augment", dest="augment", action="store_const", const=False)


def _execution_flags(flag) -> None:
    """Device, precision, DDP, data path and the other speed options."""
    flag("--amp", dest="amp", action="store_const", const=True, help="mixed precision (default: on for CUDA)")
    flag("--no-amp", dest="amp", action="store_const", const=False)
    flag("--tf32", dest="tf32", action="store_const", const=True)
    flag("--no-tf32", dest="tf32", action="store_const", const=False)
    flag("--gpu", action="store_const", const=True, help="train on the GPU (the same as --device cuda)")
    flag("--device", choices=["auto", "cuda", "cpu"], help="default auto: the GPU where CUDA works, else the CPU")
    flag(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="default auto: bf16 autocast on compute capability >= 8.0, fp16 + GradScaler below, fp32 on the CPU",
    )
    flag("--multi-gpu", "--multi_gpu", dest="multi_gpu", action="store_const", const=True, help="DDP over all GPUs")
    flag("--nproc", type=int, help="DDP processes for --multi-gpu (default: one per GPU; gloo on a CPU machine)")
    flag("--sync-bn", "--sync_bn", dest="sync_bn", action="store_const", const=True, help="SyncBatchNorm under DDP")
    flag("--batch-per-gpu", "--batch_per_gpu", dest="batch_per_gpu", action="store_const", const=True,
         help="DDP: --batch-size per process (global batch x processes; lr not rescaled). Default: the global batch "
         "--batch-size x --gradient-accumulation-steps is split over the processes")  # fmt: skip
    flag(
        "--data-path",
        "--data_path",
        dest="data_path",
        choices=["auto", "device", "loader"],
        help="device: volumes held beside the model, batches gathered by index; loader: the DataLoader "
        "(default auto: device on a GPU, loader on the CPU)",
    )
    flag("--channels-last", dest="channels_last", action="store_const", const=True, help="default on for CUDA")
    flag("--no-channels-last", dest="channels_last", action="store_const", const=False)
    flag("--compile", action="store_const", const=True, help="torch.compile the model")
    flag("--num-workers", "--num_workers", dest="num_workers", type=int)
    flag("--seed", type=int)


def _file_flags(flag, for_cv: bool = False) -> None:
    """Data, cache, outputs, tracking, resume."""
    flag("--data-root", "--data_root", dest="data_root")
    flag("--cache-dir", "--cache_dir", dest="cache_dir", help="folder of caches, or one cache folder")
    flag("--output-dir", "--output_dir", dest="output_dir", help="default results/ResNet50-3D")
    flag("--plots-every", "--plots_every", dest="plots_every", type=int, help="per-epoch plots every N epochs")
    flag("--no-tensorboard", dest="tensorboard", action="store_const", const=False, help="no TensorBoard event files")
    flag(
        "--mlflow",
        nargs="?",
        const="default",
        metavar="URI",
        help="also log to MLflow (default store: <output-dir>/mlruns; or a tracking server URI)",
    )
    if not for_cv:
        flag("--resume", help="RUN_DIR of an interrupted run to continue from its last.pt")


def config_from_args(args, with_sources: bool = False):
    """The configuration of a training command: preset < --config FILE < flags (and, if asked, each value's source)."""
    from gliograde.config import TrainConfig, resolve_with_sources

    names = {f for f in TrainConfig.__dataclass_fields__}
    overrides = {k: v for k, v in vars(args).items() if k in names and k != "preset"}
    cfg, sources = resolve_with_sources(getattr(args, "preset", "final"), getattr(args, "config", None), **overrides)
    return (cfg, sources) if with_sources else cfg


def print_sources(cfg, sources: dict) -> None:
    """--dry-run: every value and where it came from."""
    values = cfg.to_dict()
    width = max(map(len, values))
    print("\n".join(f"  {k:<{width}}  {json.dumps(v)}  ({sources.get(k, 'default')})" for k, v in values.items()))


def _add_train(sub):
    p = sub.add_parser("train", help="train one fold (the seeds' train_resnet50_3d.py)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    import json

    from gliograde.config import validate

    cfg, sources = config_from_args(args, with_sources=True)
    if args.dry_run:
        validate(cfg, log)  # train_fold validates (and warns) itself; only the dry run needs it here
        print(json.dumps(cfg.to_dict(), indent=2))
        print("where each value comes from:")
        print_sources(cfg, sources)
        what = f"resume {cfg.resume}" if cfg.resume else f"a new run in {cfg.output_dir}/runs/fold_{cfg.fold}/"
        mil = f"2D MIL ResNet{cfg.depth} ({cfg.mil_k} slices, {cfg.mil_pooling} pooling)"
        model = mil if cfg.model == "mil2d" else f"ResNet{cfg.depth}-3D {cfg.layout}"
        print(
            f"would train fold {cfg.fold} of {cfg.folds or 'K (the saved split)'} ({cfg.preset} preset, selection "
            f"{cfg.selection}): {model}, {len(cfg.modalities)} channel(s) {','.join(cfg.modalities)}, {cfg.loss} loss, "
            f"{cfg.sampler} sampler, {cfg.epochs} epochs, batch {cfg.batch_size} x {cfg.grad_accum}; {what}"
        )
        return
    from gliograde.training.trainer import train_fold

    train_fold(cfg)


# ------------------------------------------------------------------------------------------------- cv
def _add_cv(sub):
    p = sub.add_parser("cv", help="train every fold with one configuration (resumable), then summarize")
    add_train_flags(p, for_cv=True)
    p.add_argument("--only", "--fold-list", dest="fold_list", default=None, help="folds to run, e.g. 0-4 or 0,2")
    p.add_argument("--parallel-folds", type=int, default=1, help="folds trained at once (one per GPU; default 1)")
    p.add_argument("--allow-partial", action="store_true", help="summarize even if some folds are missing or failed")
    p.add_argument(
        "--launcher",
        choices=["slurm", "local"],
        default=None,
        help="submit the folds (x repeats) as a submitit job array: slurm, or local (the same code path here)",
    )
    p.add_argument("--partition", default=None, help="--launcher slurm: partition")
    p.add_argument("--account", default=None, help="--launcher slurm: account")
    p.add_argument("--gpus-per-task", type=int, default=1, help="--launcher: GPUs per fold (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="--launcher: CPUs per fold (default 8)")
    p.add_argument("--mem-gb", type=int, default=64, help="--launcher: memory per fold in GB (default 64)")
    p.add_argument("--time-min", type=int, default=720, help="--launcher: time limit per fold in minutes (720)")
    p.add_argument(
        "--sbatch", nargs="*", default=[], metavar="KEY=VALUE", help="--launcher slurm: extra sbatch options"
    )
    p.add_argument("--jobs-dir", default=None, help="--launcher: submitit logs (default <output-dir>/jobs)")
    p.add_argument(
        "--status", metavar="RESULTS", default=None, help="show which folds are done, running, failed or missing"
    )
    p.set_defaults(func=cmd_cv)


def print_summary(report: dict) -> None:
    from gliograde.evaluation.summary import table_lines

    p = report["pooled"]
    lo, hi = p["auc_ci95"]
    print("\n".join(table_lines(report)))
    print(
        f"Pooled out-of-fold ({p['n']} patients): AUC {p['auc']:.4f} (95% bootstrap CI {lo:.4f}-{hi:.4f}), "
        f"F1 {p['f1']:.4f}, accuracy {p['accuracy']:.4f}, balanced accuracy {p['balanced_accuracy']:.4f}"
    )
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(f"Summary: {Path(report['results_dir']) / 'summary.md'} (.csv, .json, report.html)")
    print(f"Figures: {', '.join(report['figures'])}")


def cmd_cv(args) -> None:
    if args.status:
        from gliograde.training.launcher import cv_status, status_table

        print(status_table(cv_status(Path(args.status))))
        return
    cfg, sources = config_from_args(args, with_sources=True)
    if args.dry_run:
        return dry_run_cv(cfg, sources, args.fold_list)
    if args.launcher:
        return launch_cv(cfg, args)
    from gliograde.training.cv import run_cv

    print_summary(run_cv(cfg, args.fold_list, args.parallel_folds, args.allow_partial))


def dry_run_cv(cfg, sources: dict, fold_list: str | None) -> None:
    """What `cv` would train: K and the repeats from the saved folds.json of the cache, as the real run takes them
    (read only: no cache is prepared and no split is made); the defaults where there is no saved split yet."""
    import dataclasses

    from gliograde.config import parse_fold_list, validate, with_split
    from gliograde.data.source import saved_split
    from gliograde.data.splits import DEFAULTS

    validate(cfg, log)
    saved = saved_split(cfg)
    if saved is not None:
        path, split = saved
        cfg = with_split(dataclasses.replace(cfg, fold=0, repeat=0), split)
        k, repeats, where = cfg.folds, cfg.repeats, f"the saved split {path}"
    else:
        k, repeats = cfg.folds or DEFAULTS["k"], cfg.repeats or DEFAULTS["repeats"]
        where = "a new split (no folds.json yet; made when the cache is)"
    print_sources(cfg, sources)
    if saved is None and cfg.leave_site_out and cfg.folds is None:  # K = the number of sites, known once made
        folds, k = fold_list or "all", "the number of sites"
    else:
        folds = parse_fold_list(fold_list, k)
    print(
        f"would train folds {folds} of K = {k} x {repeats} repeat(s) of {where} ({cfg.preset} preset, selection "
        f"{cfg.selection}) into {cfg.output_dir}, then summarize"
    )


def launch_cv(cfg, args) -> None:
    """cv through submitit: the folds as a job array (each task resumes its fold when it finds it unfinished), then
    the summary: by a dependent job on SLURM, at once locally."""
    import shutil

    from gliograde.training import launcher
    from gliograde.training.cv import name, plan_cv

    if args.launcher == "slurm" and shutil.which("sbatch") is None:
        raise GliogradeError(launcher.NO_SBATCH)  # before any cache is prepared
    cfg, _, todo, _ = plan_cv(cfg, args.fold_list)
    folder = Path(args.jobs_dir or Path(cfg.output_dir) / "jobs")
    extra = dict(item.split("=", 1) for item in args.sbatch) if args.sbatch else None
    options = {"partition": args.partition, "account": args.account}
    jobs = []
    if todo:
        jobs = launcher.submit_folds(
            todo, args.launcher, folder, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
            mem_gb=args.mem_gb, timeout_min=args.time_min, extra_sbatch=extra, **options,
        )  # fmt: skip
        log.info("submitted %d fold(s) (%s): %s", len(jobs), args.launcher, ", ".join(j.job_id for j in jobs))
    if args.launcher == "slurm":
        summary = launcher.submit_summary(
            cfg.output_dir, jobs, args.launcher, folder, allow_partial=args.allow_partial, **options
        )
        print(f"submitted: folds {[j.job_id for j in jobs]}, summary {summary.job_id} (after them)")
        print(f"follow with: gliograde cv --status {cfg.output_dir}")
        return
    _, failures = launcher.wait_and_collect(jobs) if jobs else ({}, {})
    for key, why in sorted(failures.items()):
        log.error("%s failed: %s", name(key), why)
    summary = launcher.submit_summary(cfg.output_dir, jobs, args.launcher, folder, allow_partial=args.allow_partial)
    print_summary(summary.result())


# ------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="re-score a run's selected checkpoint into a new evaluation_* folder")
    add_evaluate_flags(p)
    p.set_defaults(func=cmd_evaluate)


def add_evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run folder (results/.../runs/fold_k/run_...)")
    p.add_argument(
        "--checkpoint",
        default="auto",
        choices=["auto", "best", "best_ema"],
        help="auto = best_ema.pt if present, else best.pt (last.pt is never evaluated)",
    )
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None, help="the cache, if it moved")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                   help="where to score (default: the run's own setting)")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: the run's own precision on the same kind of device, else this device's rule")
    p.add_argument(
        "--attention",
        action="store_true",
        help="also measure where the model looks: Grad-CAM mass inside each case's tumour mask, pointing game",
    )
    p.add_argument(
        "--saliency-layer",
        dest="saliency_layer",
        choices=["layer3", "layer4"],
        default="layer4",
        help="Grad-CAM layer for --attention (layer3: 8^3 instead of 4^3 at 128^3)",
    )


def cmd_evaluate(args) -> None:
    from gliograde.evaluation.evaluate import evaluate_run

    evaluate_run(args.run, args.checkpoint, args.cache_dir, args.attention, args.saliency_layer, args.device,
                 args.precision)  # fmt: skip


# ------------------------------------------------------------------------------------------ summarize
def _add_summarize(sub):
    p = sub.add_parser("summarize", help="per-fold table, mean ± std, pooled AUC with CI, site audit")
    p.add_argument("--results", default="results/ResNet50-3D", help="the results folder (with runs/)")
    p.add_argument("--runs", nargs="+", default=None, help="use these run folders instead of the newest per fold")
    p.add_argument("--allow-partial", action="store_true", help="summarize fewer than K folds, labelled partial")
    p.add_argument(
        "--allow-mixed", action="store_true", help="summarize folds trained with different configurations (labelled)"
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_summarize)


def cmd_summarize(args) -> None:
    from gliograde.evaluation.summary import summarize

    print_summary(summarize(args.results, args.runs, args.allow_partial, args.bootstrap, args.seed, args.allow_mixed))


# -------------------------------------------------------------------------------------------- compare
def _add_compare(sub):
    p = sub.add_parser("compare", help="paired comparison of results folders on the patients both hold out")
    p.add_argument("results", nargs="+", help="results folders (with runs/): the first is the reference A")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_A/compare_YYYYMMDD_HHMMSS)")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    from gliograde.evaluation.compare import compare

    report = compare(args.results, out=args.out, n_boot=args.bootstrap, seed=args.seed)
    for pair in report["pairs"]:
        print(pair["verdict"])
        for w in pair.get("warnings", []):
            print(f"WARNING: {w}")
    print(f"Comparison: {report['out']}/compare.md (.json, compare_roc.png)")


# -------------------------------------------------------------------------------------------- predict
def _add_predict(sub):
    p = sub.add_parser("predict", help="P(HGG) of new cases from the folds' ensemble, with optional saliency")
    p.add_argument("--runs", nargs="+", default=["results/ResNet50-3D"], help="results folder(s) or run folder(s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--case", nargs="+", help="case folder(s) with the four modality files")
    src.add_argument("--data-root", "--data_root", dest="data_root", help="a folder of case folders")
    p.add_argument("--out", default=None, help="new folder for the outputs (default predictions/predict_<time>)")
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "best_ema"])
    p.add_argument(
        "--onnx",
        metavar="MODEL_DIR",
        default=None,
        help="predict with an exported ONNX ensemble (gliograde export) through ONNX Runtime, without the training "
        "code; --runs, --tta and --saliency do not apply",
    )
    p.add_argument("--tta", action="store_true", help="average over the 8 axis-flip versions of each volume")
    p.add_argument("--saliency", action="store_true", help="Grad-CAM NIfTI on the case's grid + PNG per case")
    p.add_argument(
        "--saliency-layer",
        dest="saliency_layer",
        choices=["auto", "layer1", "layer2", "layer3", "layer4"],
        default="auto",
        help="Grad-CAM layer (auto: the deepest with a map of at least 4 voxels per edge; layer3 is 8^3 at 128^3)",
    )
    p.add_argument(
        "--allow-mixed", action="store_true", help="ensemble folds trained with different configurations anyway"
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run the ensemble (precision: the runs' own on the same kind of device)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> None:
    from gliograde.data.brats import cases_to_predict, read_case_folder

    cases = [read_case_folder(c) for c in args.case] if args.case else cases_to_predict(args.data_root)
    if args.onnx:  # onnxruntime, numpy and nibabel only: neither torch nor the networks nor the training code
        from gliograde.files import new_stamped_dir
        from gliograde.inference.onnx_predict import predict_cases_onnx

        out = Path(args.out) if args.out else new_stamped_dir("predictions", "predict")
        predict_cases_onnx(cases, args.onnx, out)  # refuses an --out that already holds files
        log.info("predictions (ONNX Runtime, %s): %s (and .json)", args.onnx, out / "predictions.csv")
        return
    from gliograde.inference.predict import load_ensemble, output_dir, predict_cases

    members = load_ensemble(args.runs, args.checkpoint, args.allow_mixed)
    log.info("ensemble of %d checkpoint(s); %d case(s) to predict", len(members), len(cases))
    out = output_dir(args.out)
    from gliograde.runtime import pick_device

    predict_cases(cases, members, out, args.tta, args.saliency, device=pick_device(args.device),
                  saliency_layer=args.saliency_layer)  # fmt: skip
    log.info("predictions: %s (and .json)", out / "predictions.csv")
    if args.saliency:
        log.info("saliency maps: %s", out / "saliency")


# ------------------------------------------------------------------------------------------- validate
def _add_validate(sub):
    p = sub.add_parser("validate", help="score the CV ensemble on a labelled cohort it never saw (external validation)")
    p.add_argument("--runs", required=True, help="the results folder of the cross-validation (runs/fold_k/...)")
    p.add_argument(
        "--data-root",
        "--data_root",
        dest="data_root",
        required=True,
        help="the labelled cohort: HGG/ and LGG/ case folders, or case folders with name_mapping.csv",
    )
    p.add_argument("--out", default=None, help="new folder for the outputs (default validation/validate_<time>)")
    p.add_argument("--tta", action="store_true", help="average over the 8 axis-flip versions of each volume")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="score a cohort that shares patients with the training folds; outputs labelled so",
    )
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "best_ema"])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> None:
    from gliograde.inference.validate import validate

    report = validate(args.runs, args.data_root, args.out, args.tta, args.allow_overlap, args.checkpoint, args.device)
    m = report["metrics"]
    ci = m["auc_ci"]
    span = f" (95 % CI {ci['ci_low']:.4f}-{ci['ci_high']:.4f}, Newcombe)" if "ci_low" in ci else ""
    auc = "n/a" if m["auc"] is None or m["auc"] != m["auc"] else f"{m['auc']:.4f}"
    lead = f"{report['label']}: " if report["label"] else ""
    print(f"{lead}AUC {auc}{span} on {m['n']} patients ({m['n_hgg']} HGG, {m['n_lgg']} LGG)")
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(f"Validation: {report['out']}/validation.md (.json, report.html, predictions.csv)")


# --------------------------------------------------------------------------------------------- export
def _add_export(sub):
    p = sub.add_parser("export", help="the selected checkpoint(s) as ONNX or TorchScript, with a JSON sidecar each")
    p.add_argument("target", help="a run folder, or a results folder (one model per fold)")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, help="new or empty folder for the model files and their sidecars")
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "best_ema"])
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from gliograde.export import export

    files = export(args.target, args.out, args.fmt, args.checkpoint)
    for f in files:
        print(f"{f}  (+ {f.with_suffix('.json').name})")


# ---------------------------------------------------------------------------------------------- bench
def _add_bench(sub):
    p = sub.add_parser("bench", help="the DataLoader+MONAI pipeline against the fast path; figures and JSON")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--depth", type=int, choices=[10, 18, 34, 50, 101, 152, 200], default=None)
    p.add_argument("--layout", choices=["strided", "medicalnet"], default="strided")
    p.add_argument("--size", type=int, default=None, help="volume edge (default 128 on a GPU, 48 on the CPU)")
    p.add_argument("--channels", type=int, default=4, choices=[1, 2, 3, 4])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="measured batches per figure")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", type=int, default=None, help="synthetic cases in the benchmark cache")
    p.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers (default min(8, cpus))")
    p.add_argument("--preprocess-cases", type=int, default=0, help="cases for the preprocessing figure (0 = 4/core)")
    p.add_argument(
        "--preprocess-shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"), help="their grid"
    )
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    p.add_argument("--workdir", default=None, help="keep the synthetic data and cache here (default: a temp folder)")
    p.add_argument(
        "--trainer",
        action="store_true",
        help="time the real train_fold loop instead (volumes/s, data wait, MFU, peak memory, projected CV time)",
    )
    p.add_argument("--epochs", type=int, default=None, help="--trainer: epochs (default 3; the first is warm-up)")
    p.add_argument("--no-mil", dest="mil", action="store_false", help="--trainer: skip the 2D MIL model's figures")
    p.add_argument("--min-steps", type=int, default=20,
                   help="--trainer: steady-state optimizer steps at least (epochs are added until reached)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    import torch

    from gliograde.bench import BenchConfig, defaults, run_bench, table, write_report
    from gliograde.data.loader import default_workers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GliogradeError("--device cuda: CUDA is not available (CPU build of torch, or no GPU)")
    d = defaults(device)
    if args.trainer:
        from gliograde.bench import run_trainer_bench, trainer_table

        report = run_trainer_bench(
            device,
            args.depth or d["depth"],
            args.size or d["size"],
            args.batch_size or d["batch_size"],
            args.channels,
            args.epochs or 3,
            args.cases or d["cases"],
            workdir=Path(args.workdir) if args.workdir else None,
            log=log.info,
            mil=args.mil,
            min_steps=args.min_steps,
        )
        print(trainer_table(report))
        if args.json:
            write_report(report, args.json)
            log.info("figures written to %s", args.json)
        return
    cfg = BenchConfig(
        device=device,
        depth=args.depth or d["depth"],
        layout=args.layout,
        size=args.size or d["size"],
        channels=args.channels,
        batch_size=args.batch_size or d["batch_size"],
        steps=args.steps or d["steps"],
        warmup=args.warmup,
        cases=args.cases or d["cases"],
        workers=default_workers() if args.workers is None else args.workers,
        preprocess_cases=args.preprocess_cases,
        preprocess_shape=tuple(args.preprocess_shape),
    )
    if cfg.cases < 2 * cfg.batch_size:
        raise GliogradeError(f"--cases {cfg.cases} is too few for batches of {cfg.batch_size}")
    report = run_bench(cfg, Path(args.workdir) if args.workdir else None, log=log.info)
    print(table(report))
    if args.json:
        write_report(report, args.json)
        log.info("figures written to %s", args.json)


# --------------------------------------------------------------------------------------------- doctor
def _add_doctor(sub):
    p = sub.add_parser("doctor", help="versions, GPUs, precision and its kernels vs fp32, torch.compile, cache, disk")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="the device you will train on")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default="cache", help="the cache folder to check")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    p.add_argument("--no-compile-check", dest="compile_check", action="store_false", help="skip torch.compile")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    """Exit 1 with a one-line reason where something asked for is broken (not the usual 2 of a usage error)."""
    from gliograde import doctor

    try:
        return doctor.run(args.device, args.cache_dir, args.json, args.compile_check)
    except GliogradeError as e:
        print(f"gliograde doctor: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="the embedded default job on a synthetic BraTS-like set (CPU, minutes)")
    p.add_argument("--out", default="gliograde-demo", help="folder for everything the demo writes")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from gliograde.config import resolve
    from gliograde.data.brats import discover_cases
    from gliograde.data.synthetic import synthesize
    from gliograde.inference.predict import decision_text, load_ensemble, output_dir, predict_cases
    from gliograde.training.cv import run_cv

    out = Path(args.out)
    start = time.perf_counter()
    log.info("[1/4] synthesizing %d BraTS-like cases (64 x 64 x 48 voxels, NIfTI, BraTS 2018 layout) ...", args.cases)
    data, reused = synthesize(out / "data", args.cases, (64, 64, 48), seed=42, workers=args.workers)
    log.info("      %s %s", "reused" if reused else "wrote", data)
    log.info("[2/4] preprocessing to a 32^3 cache and writing 5 stratified folds ...")
    from gliograde.data.splits import SplitSpec

    cache, _ = prepare_and_split(data, out / "cache", 32, args.workers, False, SplitSpec(k=5, seed=42))
    results = out / "results" / "ResNet10-3D"
    log.info("[3/4] 5-fold cross-validation with the cpu-demo preset (ResNet10-3D, 4 channels, 32^3) ...")
    cfg = resolve("cpu-demo", cache_dir=str(cache.path), output_dir=str(results))
    report = run_cv(cfg)
    log.info("[4/4] two new synthetic patients (never seen in training): 5-fold ensemble, flip TTA, Grad-CAM ...")
    new, _ = synthesize(out / "new_cases", 2, (64, 64, 48), seed=2024, workers=1, first_index=args.cases)
    members = load_ensemble([results])
    pred_dir = output_dir(None, out / "predictions")
    records = predict_cases(discover_cases(new).cases, members, pred_dir, tta=True, saliency=True)
    print_summary(report)
    for r in records:
        print(f"New case (true {r['true_grade']}) {decision_text(r)}")
    log.info("demo finished in %.1f s", time.perf_counter() - start)
    log.info("Outputs:")
    log.info("  synthetic BraTS folder : %s", data)
    log.info("  volume cache + folds   : %s (volumes.npy, cases.csv, manifest.json, folds.json)", cache.path)
    log.info("  fold run folders       : %s", results / "runs" / "fold_*")
    log.info("  CV summary             : %s (.csv, .json), cv_roc_curves.png, cv_pr_curves.png", results / "summary.md")
    log.info("  new cases              : %s", new)
    log.info("  predictions            : %s (.json)", pred_dir / "predictions.csv")
    log.info("  saliency maps          : %s (NIfTI on each case's grid + PNG)", pred_dir / "saliency")
    log.info("Synthetic phantoms are far easier than real BraTS: this shows the pipeline, not a clinical result.")


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gliograde", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gliograde {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (_add_synth, _add_prepare, _add_model_info, _add_train, _add_cv, _add_evaluate, _add_summarize)
    for add in (*commands, _add_compare, _add_predict, _add_validate, _add_export, _add_bench, _add_doctor, _add_demo):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("GLIOGRADE_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc = args.func(args)
    except GliogradeError as e:
        if debug:
            raise
        print(f"gliograde {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gliograde {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
