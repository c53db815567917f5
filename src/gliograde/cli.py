"""`gliograde <command>`: the one entry point. Each command parses, calls the library and prints: the logic lives in
the modules it calls (data/source.py prepares, training/launcher.py submits, bench.py and demo.py run themselves).
The training flags of `train` and `cv` are built from the TrainConfig fields (config.option).

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
    p.add_argument("--first-index", type=int, default=0, metavar="N",
                   help="number the cases from N (a second set whose ids no case of the first has)")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="also write cohort.csv with a second binary column NAME (positive/negative, following the "
                   "tumour's look with 15 %% flipped): a non-grade question for --cohort")  # fmt: skip
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> None:
    from gliograde.data.synthetic import synthesize

    start = time.perf_counter()
    out, reused = synthesize(
        args.out, args.cases, args.shape, args.seed, args.hgg_fraction, args.workers, signal=args.signal,
        first_index=args.first_index, target=args.target,
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
    add_split_flags(p)
    add_cohort_flags(p)
    p.add_argument("--seed", dest="split_seed", type=int, default=argparse.SUPPRESS, help="alias of --split-seed")
    p.set_defaults(func=cmd_prepare)


COHORT_FIELDS = ("cohort", "target", "positive", "negative", "id_column", "patient_column", "site_column")


def add_cohort_flags(p: argparse.ArgumentParser) -> None:
    """--cohort TABLE and its columns and target: the same flags on prepare, train, cv, validate and predict."""
    g = p.add_argument_group("a cohort table instead of a BraTS folder (docs/your-own-cohort.md)")
    for f, names, kw in config_options():
        if f.name in COHORT_FIELDS:
            g.add_argument(*names, **kw)


def add_split_flags(p: argparse.ArgumentParser) -> None:
    """The split, the same flags on prepare, train and cv (TrainConfig's split fields). Not given: the saved
    folds.json decides (the defaults when none exists yet: 5 folds, seed 42, 1 repeat, no grouping, a 20 % inner
    selection part)."""
    from gliograde.config import SPLIT

    for _, names, kw in config_options(group=SPLIT):
        p.add_argument(*names, **kw)


def cmd_prepare(args) -> None:
    from gliograde.data.cohort import CohortSource
    from gliograde.data.source import prepare_and_split
    from gliograde.data.splits import SplitSpec

    spec = SplitSpec(*(getattr(args, k, None) for k in SPLIT_FIELDS))
    source = CohortSource.from_config(args)
    prepare_and_split(args.data_root, args.out, args.size, args.workers, args.skip_incomplete, spec, source)


SPLIT_FIELDS = ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction")


# --------------------------------------------------------------------------------------------- cohort
def _add_cohort(sub):
    p = sub.add_parser("cohort", help="write the cohort table of a folder in any known layout, labels joined")
    p.add_argument("root", metavar="DIR", help="BraTS 2018-2023, UCSF-PDGM, or plain case folders")
    p.add_argument("--out", required=True, help="the table to write (.csv, or .tsv); a new file")
    p.add_argument("--labels", default=None, metavar="TABLE", help="a table of labels to join (CSV/TSV)")
    p.add_argument("--join", default=None, metavar="COLUMN", help="its id column (default: id/subject/case)")
    p.add_argument("--bias", action="store_true", help="UCSF-PDGM: the bias-corrected _bias files")
    p.add_argument("--skip-incomplete", action="store_true", help="leave out cases with missing or unreadable files")
    p.set_defaults(func=cmd_cohort)


def cmd_cohort(args) -> None:
    from gliograde.data.cohort_writer import write_cohort

    if args.join is not None and args.labels is None:
        raise GliogradeError("--join names a column of --labels TABLE: pass --labels too")
    written = write_cohort(args.root, args.out, args.labels, args.join, args.bias, args.skip_incomplete)
    print(written.report(Path(args.labels) if args.labels else None))


# ----------------------------------------------------------------------------------------- model-info
def _add_model_info(sub):
    p = sub.add_parser("model-info", help="parameters, GFLOPs per volume and activation memory of a network")
    p.add_argument("--model", choices=config_choices("model"), metavar="MODEL", default="resnet3d",
                   help="the network, one of: %(choices)s (default resnet3d)")  # fmt: skip
    p.add_argument("--depth", type=int, default=None, choices=config_choices("depth"),
                   help="ResNet depth (default 50; mil2d: 18; MONAI's networks: irrelevant)")  # fmt: skip
    p.add_argument("--layout", default="strided", choices=config_choices("layout"))
    p.add_argument("--shortcut", default="B", choices=config_choices("shortcut"))
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the step the totals are given for (default 8)")
    p.set_defaults(func=cmd_model_info)


def cmd_model_info(args) -> None:
    import torch

    from gliograde.config import check_config, resolve
    from gliograde.networks import get_architecture
    from gliograde.networks.profile import meta_model, profile_description

    if args.in_channels < 1 or args.num_classes < 2 or args.batch_size < 1:
        raise GliogradeError("--in-channels and --batch-size must be at least 1, --num-classes at least 2")
    cfg = check_config(resolve("final", model=args.model, depth=args.depth, layout=args.layout, size=args.size,
                               shortcut=args.shortcut, dropout=0.0))  # fmt: skip
    desc = {**get_architecture(cfg.model).describe(cfg, args.in_channels), "num_classes": args.num_classes}
    fp32 = profile_description(desc, args.size)
    bf16 = profile_description(desc, args.size, torch.bfloat16)
    where = {"meta": "on the meta device (shapes only, nothing computed)",
             "cpu": "on the CPU, computed (its forward pass reads values: the meta device cannot run it)"}  # fmt: skip
    gib, b = 2**30, args.batch_size
    rows = [
        ("network", meta_model(desc).describe()),
        ("input", f"{args.in_channels} x {args.size}^3"),
        ("parameters", f"{fp32.params / 1e6:.2f} M"),
        ("layer4 feature map" if cfg.model == "resnet3d" else "last feature map",
         " x ".join(map(str, fp32.feature_map)) if fp32.feature_map else "none"),
        ("forward", f"{fp32.gflop_forward:.1f} GFLOP per volume"),
        ("forward + backward", f"{fp32.gflop_train:.1f} GFLOP per volume"),
        ("activations saved for backward",
         f"{fp32.activation_bytes / gib:.2f} GiB fp32, {bf16.activation_bytes / gib:.2f} GiB bf16 per volume"),
        (f"batch of {b}", f"{b * fp32.gflop_train / 1e3:.2f} TFLOP forward + backward; activations "
         f"{b * fp32.activation_bytes / gib:.1f} GiB fp32, {b * bf16.activation_bytes / gib:.1f} GiB bf16"),
        ("measured", where[fp32.measured_on]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# ---------------------------------------------------------------------------------------------- train
def add_train_flags(p: argparse.ArgumentParser, for_cv: bool = False) -> None:
    """Every training flag, built from the TrainConfig fields (config.option: spellings with the seeds' aliases,
    help, choices, --help section). A flag not given keeps the preset's value.

    --folds is K everywhere; `cv` picks folds with --only (0-4, 0,2); --fold, --repeat and --resume do not apply to
    `cv`."""
    from gliograde.config import FLAG_GROUPS, PROTOCOL

    groups = {title: p.add_argument_group(title) for title in FLAG_GROUPS}
    groups[PROTOCOL].add_argument("--config", default=argparse.SUPPRESS,
                                  help="a YAML file of configuration keys: preset < file < flags")  # fmt: skip
    for f, names, kw in config_options(for_cv):
        groups[f.metadata["group"]].add_argument(*names, **kw)
        if f.metadata.get("off"):
            groups[f.metadata["group"]].add_argument(*f.metadata["off"], dest=f.name, action="store_const",
                                                     const=False, default=argparse.SUPPRESS)  # fmt: skip
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the resolved configuration and what would run, then exit",
    )


def config_options(for_cv: bool = False, group: str | None = None) -> list[tuple]:
    """(field, spellings, add_argument keywords) of each TrainConfig field with a flag, in field order (only
    `group`'s, where given). Its type, where the metadata names none, is the field's: a bool is a switch."""
    import dataclasses
    import typing

    from gliograde.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if "group" not in meta or (for_cv and meta.get("train_only")) or group not in (None, meta["group"]):
            continue
        names = meta.pop("flags") or [f"--{f.name.replace('_', '-')}"]
        for key in ("group", "train_only", "off"):
            meta.pop(key, None)
        kw = {"dest": f.name, "default": argparse.SUPPRESS, **meta}
        if isinstance(kw.get("choices"), str):  # the name of an extension table
            kw["metavar"] = kw.get("metavar", f.name.upper())
            kw["help"] = "; ".join(filter(None, [kw.get("help"), "one of: %(choices)s"]))
            kw["choices"] = TableChoices(kw["choices"])
        base = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        if base is bool:
            kw = {"action": "store_const", "const": True, **kw}
        elif "type" not in kw:
            kw["type"] = base
        out.append((f, names, kw))
    return out


# the extension tables whose names a flag takes: (module, table)
TABLES = {"losses": ("gliograde.training.losses", "LOSSES"), "architectures": ("gliograde.networks", "ARCHITECTURES"),
          "pretrained formats": ("gliograde.networks.pretrained", "FORMATS")}  # fmt: skip


class TableChoices:
    """The names in an extension point's table (the losses, the architectures), read when first asked: parsing
    --loss imports the losses; building the parser does not (`predict --onnx` must not import torch)."""

    def __init__(self, table: str):
        self.table = table

    def names(self) -> list[str]:
        import importlib

        module, name = TABLES[self.table]
        return sorted(getattr(importlib.import_module(module), name))

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __iter__(self):
        return iter(self.names())


def config_choices(name: str):
    """The choices of a TrainConfig field's flag (a tuple, or the extension table's names), for the commands that
    take the same value outside training."""
    from gliograde.config import TrainConfig

    choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
    return TableChoices(choices) if isinstance(choices, str) else list(choices)


def config_from_args(args, with_sources: bool = False):
    """The configuration of a training command: preset < --config FILE < flags (and, if asked, each value's source)."""
    from gliograde import networks  # noqa: F401  (the architecture table: a --config file's network names its folder)
    from gliograde.config import TrainConfig, resolve_with_sources

    names = {f for f in TrainConfig.__dataclass_fields__}
    overrides = {k: v for k, v in vars(args).items() if k in names and k != "preset"}
    cfg, sources = resolve_with_sources(getattr(args, "preset", "final"), getattr(args, "config", None), **overrides)
    if "preset" in vars(args):  # the flag's default is SUPPRESS: present only where given
        sources["preset"] = "command line"
    return (cfg, sources) if with_sources else cfg


def add_results_config_flags(p: argparse.ArgumentParser, flag: str, target: bool = True) -> None:
    """The configuration whose results folder `flag` defaults to (what `cv` with the same flags writes)."""
    g = p.add_argument_group(f"the configuration whose results folder {flag} defaults to")
    g.add_argument("--preset", choices=config_choices("preset"), default=None,
                   help=f"{flag} defaults to this preset's results folder (cpu-demo: results/ResNet10-3D)")  # fmt: skip
    g.add_argument("--config", default=None, help="a YAML file of configuration keys (its output_dir, or network)")
    g.add_argument("--model", choices=config_choices("model"), metavar="MODEL", default=None,
                   help="the network, one of: %(choices)s")  # fmt: skip
    g.add_argument("--depth", type=int, choices=config_choices("depth"), default=None, help="ResNet depth")
    if target:  # predict and validate have --target among the columns of --cohort
        g.add_argument("--target", default=None, metavar="COLUMN", help="a cohort's question (results/<net>-<target>)")
        g.add_argument("--positive", default=None, metavar="VALUE",
                       help="its positive value, as cv was given it (the folder is named by --target alone)")


def default_results(args, flag: str) -> Path:
    """The results folder of the configuration the flags give (results/ResNet50-3D with none), which must exist."""
    from gliograde.runs import default_results_dir, require_results_dir

    target, positive = getattr(args, "target", None), getattr(args, "positive", None)  # a cohort's own question
    path = default_results_dir(args.preset, args.config, model=args.model, depth=args.depth, target=target,
                               positive=positive)  # fmt: skip
    return require_results_dir(path, flag)


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
    from gliograde.config import check_config
    from gliograde.networks import get_architecture
    from gliograde.training.plan import explicit_fields, plan_run  # the training package registers its tables of
    # names (losses, architectures) that check_config reads: a --config file's loss is checked by the dry run too

    cfg, sources = config_from_args(args, with_sources=True)
    if args.dry_run:
        check_config(cfg, log)  # train_fold checks (and warns) itself; only the dry run needs it here
        print(json.dumps(cfg.to_dict(), indent=2))
        print("where each value comes from:")
        print_sources(cfg, sources)
        what = f"resume {cfg.resume}" if cfg.resume else f"a new run in {cfg.output_dir}/runs/fold_{cfg.fold}/"
        spec = get_architecture(cfg.model)
        model = spec.summary(cfg) if spec.summary else spec.network_name({"model": cfg.model, "depth": cfg.depth})
        print(
            f"would train fold {cfg.fold} of {cfg.folds or 'K (the saved split)'} ({cfg.preset} preset, selection "
            f"{cfg.selection}): {model}, {len(cfg.modalities)} channel(s) {','.join(cfg.modalities)}, {cfg.loss} loss, "
            f"{cfg.sampler} sampler, {cfg.epochs} epochs, batch {cfg.batch_size} x {cfg.grad_accum}; {what}"
        )
        return
    from gliograde.training.trainer import train_fold

    # planned before the cache or the run folder is made: device, weights, K, the batch against this fold's part
    train_fold(plan_run(cfg, explicit_fields(sources), [cfg.fold], warn=False).cfg)


# ------------------------------------------------------------------------------------------------- cv
def _add_cv(sub):
    p = sub.add_parser("cv", help="train every fold with one configuration (resumable), then summarize")
    add_train_flags(p, for_cv=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", "--fold-list", dest="fold_list", default=None, help="folds to run, e.g. 0-4 or 0,2")
    which.add_argument("--fold", dest="fold_list", type=one_fold, default=None, help="one fold to run: --only N")
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
    from gliograde.runs import model_line

    p = report["pooled"]
    lo, hi = p["auc_ci95"]
    print(f"Model: {model_line(report.get('model') or {})}")
    print("\n".join(table_lines(report)))
    print(
        f"Pooled out-of-fold ({p['n']} patients): AUC {p['auc']:.4f} (95% bootstrap CI {lo:.4f}-{hi:.4f}), "
        f"F1 {p['f1']:.4f}, accuracy {p['accuracy']:.4f}, balanced accuracy {p['balanced_accuracy']:.4f}"
    )
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(f"Summary: {Path(report['results_dir']) / 'summary.md'} (.csv, .json, report.html)")
    print(f"Figures: {', '.join(report['figures'])}")


def one_fold(value: str) -> list[int]:
    """cv --fold N: the fold list of one fold (what --only N gives)."""
    try:
        return [int(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not one fold number; several folds: --only {value}") from None


def cmd_cv(args) -> None:
    if args.status:
        return cv_status_table(Path(args.status))
    cfg, sources = config_from_args(args, with_sources=True)
    if args.dry_run:
        only = args.fold_list
        return dry_run_cv(cfg, sources, ",".join(map(str, only)) if isinstance(only, list) else only)
    from gliograde.training.plan import explicit_fields

    if args.launcher:
        return cmd_cv_launch(cfg, args, explicit_fields(sources))
    from gliograde.training.cv import run_cv

    print_summary(run_cv(cfg, args.fold_list, args.parallel_folds, args.allow_partial, explicit_fields(sources)))


def cv_status_table(results: Path) -> None:
    """cv --status: the folds of a results folder; a folder that is not there is an error, not 'no runs found'."""
    from gliograde.training.launcher import cv_status, status_table

    if not results.is_dir():
        raise GliogradeError(f"--status {results}: no such folder (give the --output-dir of a cv)")
    if not (results / "runs").is_dir() and not (results / "jobs").is_dir():
        raise GliogradeError(f"--status {results}: not the results folder of a cv (no runs/ and no jobs/ in it)")
    print(status_table(cv_status(results)))


def dry_run_cv(cfg, sources: dict, fold_list: str | None) -> None:
    """What `cv` would train (training/plan.py: `preview_cv`), with every value and where it came from."""
    from gliograde.training.plan import explicit_fields, preview_cv

    plan = preview_cv(cfg, explicit_fields(sources), fold_list)
    cfg = plan.cfg
    print_sources(cfg, sources)
    adapted = f"; adapted to the cohort: {'; '.join(cfg.adaptations)}" if cfg.adaptations else ""
    print(
        f"would train folds {plan.folds} of K = {plan.k} x {plan.repeats} repeat(s) of {plan.where} ({cfg.preset} "
        f"preset, selection {cfg.selection}, batch {cfg.batch_size}) into {cfg.output_dir}, then summarize{adapted}"
    )


def cmd_cv_launch(cfg, args, explicit: set[str]) -> None:
    """cv --launcher: the folds as a submitit job array, then the summary (training/launcher.py)."""
    from gliograde.training.launcher import JobSettings, launch_cv

    settings = JobSettings(args.launcher, args.jobs_dir, args.partition, args.account, args.gpus_per_task,
                           args.cpus_per_task, args.mem_gb, args.time_min, args.sbatch, args.allow_partial)  # fmt: skip
    jobs, summary = launch_cv(cfg, settings, args.fold_list, explicit)
    if args.launcher == "slurm":
        print(f"submitted: folds {[j.job_id for j in jobs]}, summary {summary.job_id} (after them)")
        print(f"follow with: gliograde cv --status {cfg.output_dir}")
        return
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
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: the run's own precision on the same kind of device, else this device's rule",
    )
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
        help="Grad-CAM layer of a ResNet-3D for --attention (layer3: 8^3 instead of 4^3 at 128^3); other networks: "
        "their last feature map, a ViT its attention rollout, and one line where a network makes no map",
    )


def cmd_evaluate(args) -> None:
    from gliograde.evaluation.evaluate import evaluate_run

    evaluate_run(args.run, args.checkpoint, args.cache_dir, args.attention, args.saliency_layer, args.device,
                 args.precision)  # fmt: skip


# ------------------------------------------------------------------------------------------ summarize
def _add_summarize(sub):
    p = sub.add_parser("summarize", help="per-fold table, mean ± std, pooled AUC with CI, site audit")
    p.add_argument("--results", default=None,
                   help="the results folder (with runs/); default: that of --preset/--config/--model/--depth, "
                   "else results/ResNet50-3D")  # fmt: skip
    p.add_argument("--runs", nargs="+", default=None, help="use these run folders instead of the newest per fold")
    p.add_argument("--allow-partial", action="store_true", help="summarize fewer than K folds, labelled partial")
    p.add_argument(
        "--allow-mixed", action="store_true", help="summarize folds trained with different configurations (labelled)"
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_results_config_flags(p, "--results")
    p.set_defaults(func=cmd_summarize)


def cmd_summarize(args) -> None:
    from gliograde.evaluation.summary import summarize

    results = args.results or default_results(args, "--results")
    print_summary(summarize(results, args.runs, args.allow_partial, args.bootstrap, args.seed, args.allow_mixed))


# -------------------------------------------------------------------------------------------- compare
def _add_compare(sub):
    p = sub.add_parser("compare", help="paired comparison of results folders on the patients both hold out")
    p.add_argument("results", nargs="+", help="results folders (with runs/): the first is the reference A")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_A/compare_YYYYMMDD_HHMMSS)")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    from gliograde.evaluation.compare import compare, setting_text

    report = compare(args.results, out=args.out, n_boot=args.bootstrap, seed=args.seed)
    for pair in report["pairs"]:
        print(pair["verdict"])
        if pair.get("settings"):
            changes = "; ".join(f"{d['setting']} {setting_text(d['a'])} -> {setting_text(d['b'])}"
                                for d in pair["settings"])  # fmt: skip
            print(f"{pair['name_b']} differs from {pair['name_a']} in: {changes}")
        for w in pair.get("warnings", []):
            print(f"WARNING: {w}")
    print(f"Comparison: {report['out']}/compare.md (.json, compare_roc.png)")


# -------------------------------------------------------------------------------------------- predict
def _add_predict(sub):
    p = sub.add_parser("predict", help="P(HGG) of new cases from the folds' ensemble, with optional saliency")
    p.add_argument("--runs", nargs="+", default=None,
                   help="results folder(s) or run folder(s); default: the results folder of --preset/--config/--model/"
                   "--depth, else results/ResNet50-3D")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--case", nargs="+", help="case folder(s) with the four modality files")
    src.add_argument("--data-root", "--data_root", dest="data_root", help="a folder of case folders (any layout)")
    src.add_argument("--cohort", metavar="TABLE", help="a cohort table (rows without a label are predicted too)")
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
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where to run the ensemble (precision: the runs' own on the same kind of device)",
    )
    add_table_columns(p)
    add_results_config_flags(p, "--runs", target=False)
    p.set_defaults(func=cmd_predict)


def add_table_columns(p: argparse.ArgumentParser) -> None:
    """The columns and target of --cohort (predict and validate give --cohort itself beside --data-root)."""
    g = p.add_argument_group("the columns of --cohort TABLE (docs/your-own-cohort.md)")
    for f, names, kw in config_options():
        if f.name in COHORT_FIELDS[1:]:
            g.add_argument(*names, **kw)


def cmd_predict(args) -> None:
    from gliograde import GRADES
    from gliograde.data.brats import UNKNOWN_GRADE, read_case_folder
    from gliograde.data.cohort import CohortSource

    def grade_of(folder: str) -> str:  # a case folder under HGG/ or LGG/ (BraTS 2018/2019 layout) has a known grade
        parent = Path(folder).expanduser().resolve().parent.name
        return parent if parent in GRADES else UNKNOWN_GRADE

    if args.case:
        cases = [read_case_folder(c, grade_of(c)) for c in args.case]
    else:
        cases = CohortSource.from_config(args).cases_to_predict()
    if args.onnx:  # onnxruntime, numpy and nibabel only: neither torch nor the networks nor the training code
        from gliograde.files import new_stamped_dir
        from gliograde.inference.onnx_predict import predict_cases_onnx

        out = Path(args.out) if args.out else new_stamped_dir("predictions", "predict")
        predict_cases_onnx(cases, args.onnx, out)  # refuses an --out that already holds files
        log.info("predictions (ONNX Runtime, %s): %s (and .json)", args.onnx, out / "predictions.csv")
        return
    from gliograde.inference.predict import load_ensemble, output_dir, predict_cases

    members = load_ensemble(args.runs or [default_results(args, "--runs")], args.checkpoint, args.allow_mixed)
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
    p.add_argument("--runs", default=None,
                   help="the results folder of the cross-validation (runs/fold_k/...); default: that of --preset/"
                   "--config/--model/--depth, else results/ResNet50-3D")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-root", "--data_root", dest="data_root",
                     help="the labelled cohort: HGG/ and LGG/ case folders, or case folders with "
                     "name_mapping.csv")  # fmt: skip
    src.add_argument("--cohort", metavar="TABLE", help="the labelled cohort as a table (its target: the runs')")
    add_table_columns(p)
    p.add_argument("--out", default=None, help="new folder for the outputs (default validation/validate_<time>)")
    p.add_argument("--tta", action="store_true", help="average over the 8 axis-flip versions of each volume")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="score a cohort that shares patients with the training folds; outputs labelled so",
    )
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "best_ema"])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    add_results_config_flags(p, "--runs", target=False)
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> None:
    from gliograde.inference.validate import validate
    from gliograde.inference.validate_report import validation_model
    from gliograde.runs import model_line

    runs = args.runs or default_results(args, "--runs")
    from gliograde.data.cohort import CohortSource

    source = CohortSource.from_config(args)
    report = validate(runs, source, args.out, args.tta, args.allow_overlap, args.checkpoint, args.device)
    m = report["metrics"]
    ci = m["auc_ci"]
    span = f" (95 % CI {ci['ci_low']:.4f}-{ci['ci_high']:.4f}, Newcombe)" if "ci_low" in ci else ""
    auc = "n/a" if m["auc"] is None or m["auc"] != m["auc"] else f"{m['auc']:.4f}"
    lead = f"{report['label']}: " if report["label"] else ""
    print(f"Model: {model_line(validation_model(report))}")
    neg, pos = report.get("classes") or ("LGG", "HGG")
    print(f"{lead}AUC {auc}{span} on {m['n']} patients ({m['n_hgg']} {pos}, {m['n_lgg']} {neg})")
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
    p.add_argument("--depth", type=int, choices=config_choices("depth"), default=None)
    p.add_argument("--layout", choices=config_choices("layout"), default="strided")
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
    p.add_argument("--model", choices=config_choices("model"), metavar="MODEL", default="resnet3d",
                   help="--trainer: the network to time, beside the ResNet-50 baseline on the same cache (no MIL "
                   "figures; on the CPU at 32^3 unless --size says), one of: %(choices)s")  # fmt: skip
    p.add_argument(
        "--min-steps",
        type=int,
        default=20,
        help="--trainer: steady-state optimizer steps at least (epochs are added until reached)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    from gliograde import bench

    device = bench.bench_device(args.device)
    workdir = Path(args.workdir) if args.workdir else None
    if args.model != "resnet3d" and (not args.trainer or args.depth is not None):
        raise GliogradeError(f"--model {args.model} is timed by --trainer, beside the ResNet-50 baseline: pass "
                             "--trainer, and no --depth (the baseline's is 50)")  # fmt: skip
    if args.trainer:
        report = bench.run_trainer_bench(device, args.depth, args.size, args.batch_size, args.channels, args.epochs,
                                         args.cases, workdir=workdir, log=log.info, mil=args.mil,
                                         min_steps=args.min_steps, model=args.model)  # fmt: skip
        print(bench.trainer_table(report))
    else:
        cfg = bench.bench_config(device, args.depth, args.layout, args.size, args.channels, args.batch_size, args.steps,
                                 args.warmup, args.cases, args.workers, args.preprocess_cases,
                                 args.preprocess_shape)  # fmt: skip
        report = bench.run_bench(cfg, workdir, log=log.info)
        print(bench.table(report))
    if args.json:
        bench.write_report(report, args.json)
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
    from gliograde.demo import run_demo
    from gliograde.inference.predict import decision_text

    result = run_demo(args.out, args.cases, args.workers)
    print_summary(result.report)
    for r in result.records:
        print(f"New case (true {r['true_grade']}) {decision_text(r)}")
    log.info("demo finished in %.1f s", result.seconds)
    log.info("Outputs:")
    for what, where in result.outputs:
        log.info("  %-22s : %s", what, where)
    log.info("Synthetic phantoms are far easier than real BraTS: this shows the pipeline, not a clinical result.")


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gliograde", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gliograde {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (
        _add_synth,
        _add_cohort,
        _add_prepare,
        _add_model_info,
        _add_train,
        _add_cv,
        _add_evaluate,
        _add_summarize,
    )
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
