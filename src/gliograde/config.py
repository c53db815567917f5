"""The training configuration: one dataclass, presets as YAML (configs/ = src/gliograde/presets/), validation.

Resolution order: dataclass defaults < preset file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from gliograde import MODALITIES
from gliograde.errors import GliogradeError, unknown_name

PRESETS = ("final", "ldam-drw", "cpu-demo")
# Fields that change how a run is executed or reported, not what it computes: a resumed run may differ in these.
RUNTIME_FIELDS = {
    "cohort",
    "resume",
    "num_workers",
    "output_dir",
    "plots_every",
    "dry_run",
    "data_root",
    "cache_dir",
    "gpu",
    "device",
    "precision",
    "multi_gpu",
    "nproc",
    "channels_last",
    "compile",
    "preset",
    "tensorboard",
    "mlflow",
    "adaptations",
}


# Fields added after runs were first recorded, with the value every run recorded before them had: a run that lacks
# one did what this value does (summarize, compare and predict then see one configuration, not a mix).
IMPLIED_BEFORE_ADDED = {
    "target": None, "positive": None, "negative": None, "id_column": None, "patient_column": None,
    "site_column": None, "pretrained_format": None, "probe": False, "freeze_epochs": 0, "layer_decay": 1.0,
}  # fmt: skip


class ConfigError(GliogradeError):
    """A value that makes no sense, explained."""


# The names a field may take where an extension point owns them (training.losses.LOSSES, networks.ARCHITECTURES):
# config sits on the floor below those tables, so each table registers itself here when its module is imported, and
# check_config() checks the field against the live table (a loss registered later is accepted too).
CHOICES: dict[str, tuple[str, Mapping[str, object]]] = {}


def register_choices(key: str, what: str, table: Mapping[str, object]) -> None:
    """`key`: the TrainConfig field; `what`: how messages name one entry ("loss"); `table`: name -> spec."""
    CHOICES[key] = (what, table)


# The --help sections of the training flags, in the order `gliograde train --help` shows them
PROTOCOL, SPLIT, OPTIMISATION, MODEL = "protocol", "the split (folds.json)", "optimisation", "model"
EXECUTION, FILES = "execution (device, precision, DDP, speed)", "files and tracking"
FLAG_GROUPS = (PROTOCOL, SPLIT, OPTIMISATION, MODEL, EXECUTION, FILES)


def option(default=dataclasses.MISSING, *flags: str, group: str, factory=None, **flag):
    """A TrainConfig field and its command-line flag in one line (cli.py builds the flags of `train` and `cv` from
    these). `flags`: every spelling, the seeds' aliases among them (default: --field-name); `group`: its --help
    section; `flag`: help, choices (a tuple, or the name of the extension table that owns them: "losses",
    "architectures"), and where the field's type does not say it: type, const, nargs, metavar, `off` (spellings
    that set the field False: --no-amp), `train_only` (not a flag of `cv`)."""
    metadata = {"flags": list(flags), "group": group, **flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def fold_count(value: str) -> int:
    """--folds is K in every command; a fold list (cv) is --only."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of folds: --folds is K in every command; pick folds with --only {value}"
        ) from None


@dataclass
class TrainConfig:
    # data
    data_root: str | None = option(None, "--data-root", "--data_root", group=FILES)
    cache_dir: str = option("cache", "--cache-dir", "--cache_dir", group=FILES,
                            help="folder of caches, or one cache folder")  # fmt: skip
    # a cohort table instead of a BraTS folder, and the binary question asked of it (data/cohort.py); none: the
    # seeds' task, HGG vs LGG from the BraTS layout
    cohort: str | None = option(None, group=FILES, metavar="TABLE",
                                help="a CSV/TSV of exams: id, patient, label, site, the modality files")  # fmt: skip
    target: str | None = option(None, "--target", "--label-column", group=PROTOCOL, metavar="COLUMN",
                                help="the cohort table's column to predict (default: label/grade/class)")  # fmt: skip
    positive: str | None = option(None, group=PROTOCOL, metavar="VALUE",
                                  help="the target's positive value, e.g. wildtype (default: the column's two "
                                  "values, HGG/1/yes positive)")  # fmt: skip
    negative: str | None = option(None, group=PROTOCOL, metavar="VALUE",
                                  help="the negative value (default: any other); other rows excluded")  # fmt: skip
    id_column: str | None = option(None, "--id-column", group=FILES, metavar="COLUMN", help="default: id/case/subject")
    patient_column: str | None = option(None, "--patient-column", group=FILES, metavar="COLUMN",
                                        help="default: patient/patient_id, else one exam per patient")  # fmt: skip
    site_column: str | None = option(None, "--site-column", group=FILES, metavar="COLUMN",
                                     help="default: site/center/institution, else parsed from the id")  # fmt: skip
    size: int = option(128, group=MODEL, help="edge of the cubic input volumes (default 128)")
    modalities: list[str] = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        dataclasses.MISSING, "--modality", "--modalities", factory=lambda: list(MODALITIES), group=PROTOCOL, type=str,
        help="one modality, 'all', or a comma list (t1,t1ce,t2,flair)")  # fmt: skip
    fold: int = option(0, group=PROTOCOL, train_only=True, help="fold to train, 0..K-1 (default 0)")
    # the split (folds.json): None = "not asked", taken from the saved split (defaults when one is made:
    # 5 folds, seed 42, 1 repeat, no grouping, 20 % inner selection part); see data/splits.py
    folds: int | None = option(None, "--folds", "--num-folds", "--k", group=SPLIT, type=fold_count,
                               help="number of folds K (default: the saved split's, else 5)")  # fmt: skip
    split_seed: int | None = option(None, "--split-seed", "--split_seed", group=SPLIT,
                                    help="seed of the fold split (default: the saved split's, else 42)")  # fmt: skip
    repeats: int | None = option(None, group=SPLIT, help="repeated CV: R fold sets, seeds S..S+R-1")
    repeat: int = option(0, group=PROTOCOL, train_only=True,
                         help="repeat of the split the fold belongs to (default 0)")  # fmt: skip
    group_by: str | None = option(None, "--group-by", "--group_by", group=SPLIT, choices=("site",),
                                  help="no acquisition site in two folds (StratifiedGroupKFold)")  # fmt: skip
    leave_site_out: bool | None = option(None, "--leave-site-out", "--leave_site_out", group=SPLIT,
                                         help="one fold per site")  # fmt: skip
    inner_fraction: float | None = option(None, "--inner-fraction", "--inner_fraction", group=SPLIT,
                                          help="share of each fold's training patients set aside for selection "
                                          "(default 0.2)")  # fmt: skip
    # the protocol: inner = early stopping, checkpoint, threshold and calibration chosen on the selection part of the
    # training patients, the outer fold scored once at the end; outer = the seeds' (chosen on the reported fold)
    selection: str = option("inner", group=PROTOCOL, choices=("inner", "outer"),
                            help="inner (default): early stopping, checkpoint, threshold and calibration chosen on a "
                            "selection part of the training patients, the fold scored once; outer: chosen on the "
                            "reported fold (the seeds'; optimistic)")  # fmt: skip
    threshold_at_specificity: float | None = option(
        None, group=PROTOCOL, help="the lowest threshold reaching this specificity on the selection part (default: "
        "Youden's J)")  # fmt: skip
    temperature: bool = option(False, group=PROTOCOL, help="fit a temperature on the selection part")
    # model
    model: str = option("resnet3d", group=MODEL, choices="architectures",
                        help="the network (default resnet3d: MedicalNet ResNet-3D; mil2d: 2D MIL over "
                        "entropy-selected axial slices; MONAI's 3D networks, docs/networks.md)")  # fmt: skip
    mil_k: int = option(16, "--mil-k", "--mil_k", group=MODEL,
                        help="mil2d: entropy-selected axial slices per case (16)")  # fmt: skip
    mil_pooling: str = option("attention", group=MODEL, choices=("attention", "mean", "max"),
                              help="mil2d: bag pooling (attention: gated, Ilse et al. 2018)")  # fmt: skip
    mil_min_gap: int = option(0, group=MODEL, help="mil2d: minimum distance between selected slices")
    mil_entropy_modality: str | None = option(None, group=MODEL, choices=MODALITIES,
                                              help="mil2d: rank slices on this modality's entropy (default: the mean "
                                              "over the input modalities)")  # fmt: skip
    depth: int = option(50, group=MODEL, choices=(10, 18, 34, 50, 101, 152, 200),
                        help="ResNet depth (mil2d: 18 or 34; MONAI's networks name their own: irrelevant to "
                        "them)")  # fmt: skip
    layout: str = option("strided", group=MODEL, choices=("strided", "medicalnet"))
    shortcut: str = option("B", group=MODEL, choices=("A", "B"))
    dropout: float = option(0.4, group=OPTIMISATION)
    pretrained_path: str | None = option(None, "--pretrained-path", "--pretrained_path", group=MODEL,
                                         help="pretrained weights: a MedicalNet .pth file, or a file of another "
                                         "format the network takes (docs/pretrained-weights.md)")  # fmt: skip
    pretrained_format: str | None = option(None, "--pretrained-format", "--pretrained_format", group=MODEL,
                                           choices="pretrained formats", metavar="FORMAT",
                                           help="the format of --pretrained-path (default: recognised from the "
                                           "file's keys)")  # fmt: skip
    # optimisation
    epochs: int = option(50, group=OPTIMISATION)
    batch_size: int = option(4, "--batch-size", "--batch_size", group=OPTIMISATION)
    grad_accum: int = option(1, "--gradient-accumulation-steps", "--gradient_accumulation_steps", "--grad-accum",
                             group=OPTIMISATION)  # fmt: skip
    optimizer: str = option("adam", group=OPTIMISATION, type=str.lower, choices=("adam", "adamw", "sgd"))
    lr: float = option(1e-4, "--lr", "--learning-rate", "--learning_rate", group=OPTIMISATION,
                       help="backbone learning rate")  # fmt: skip
    classifier_lr_mult: float = option(2.0, "--classifier-lr-mult", "--classifier_lr_mult", group=OPTIMISATION,
                                       help="classifier lr = lr x this (final policy: 2)")  # fmt: skip
    # fine-tuning a pretrained encoder (training/finetune.py): all off by default, the two groups above unchanged
    probe: bool = option(False, group=OPTIMISATION,
                         help="linear probing: the backbone frozen for the whole run (its BatchNorm statistics "
                         "too), only the head trains, at lr x classifier-lr-mult")  # fmt: skip
    freeze_epochs: int = option(0, "--freeze-epochs", "--freeze_epochs", group=OPTIMISATION, metavar="N",
                                help="the backbone frozen for the first N epochs (the head alone trains), then "
                                "fine-tuned with it (default 0)")  # fmt: skip
    layer_decay: float = option(1.0, "--layer-decay", "--layer_decay", group=OPTIMISATION, metavar="F",
                                help="layer-wise lr decay: the backbone's layer group i of n trains at "
                                "lr x F^(n-1-i), the input's lowest (BEiT/MAE fine-tuning: 0.65-0.75; "
                                "default 1: off)")  # fmt: skip
    weight_decay: float = option(1e-4, "--weight-decay", "--weight_decay", group=OPTIMISATION)
    momentum: float = 0.9
    scheduler: str = option("cosine", group=OPTIMISATION, type=str.lower, choices=("cosine", "step", "none"))
    warmup_epochs: int = option(3, "--warmup-epochs", "--warmup_epochs", group=OPTIMISATION)
    step_size: int = 10
    gamma: float = 0.1
    grad_clip: float = option(0.0, "--grad-clip", "--grad_clip", group=OPTIMISATION, help="max gradient norm (0 = off)")
    # class imbalance
    loss: str = option("ce", group=OPTIMISATION, type=str.lower, choices="losses", help="any case")
    sampler: str = option("weighted", group=OPTIMISATION, type=str.lower, choices=("weighted", "shuffle"),
                          help="weighted (inverse class frequency) or shuffle")  # fmt: skip
    max_m: float = option(0.5, "--max-m", "--max_m", group=OPTIMISATION, help="LDAM largest margin")
    ldam_s: float = option(30.0, "--ldam-s", "--ldam_s", "--s", group=OPTIMISATION, help="LDAM scale s")
    drw_start_epoch: int | None = option(None, "--drw-start-epoch", "--drw_start_epoch", group=OPTIMISATION,
                                         help="1-based epoch from which DRW weights apply (LDAM only)")  # fmt: skip
    # averaging and stopping
    ema_decay: float = option(0.0, "--ema-decay", "--ema_decay", group=OPTIMISATION,
                              help="EMA of the weights (0 = off)")  # fmt: skip
    patience: int = option(10, "--early-stopping", "--early_stopping", "--patience", group=OPTIMISATION,
                           help="patience in epochs")  # fmt: skip
    min_epochs: int = option(15, "--min-epochs", "--min_epochs", group=OPTIMISATION)
    min_delta: float = option(0.0, "--min-delta", "--min_delta", group=OPTIMISATION)
    # augmentation (batched, applied identically to all channels)
    augment: bool = option(True, "--no-augment", const=False, group=MODEL)
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale_range: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    # execution
    gpu: bool = option(False, group=EXECUTION, help="train on the GPU (the same as --device cuda)")
    device: str = option("auto", group=EXECUTION, choices=("auto", "cuda", "cpu"),
                         help="default auto: the GPU where CUDA works, else the CPU")  # fmt: skip
    precision: str = option("auto", group=EXECUTION, choices=("auto", "bf16", "fp16", "fp32"),
                            help="default auto: bf16 autocast on compute capability >= 8.0, fp16 + GradScaler below, "
                            "fp32 on the CPU")  # fmt: skip
    multi_gpu: bool = option(False, "--multi-gpu", "--multi_gpu", group=EXECUTION, help="DDP over all GPUs")
    nproc: int | None = option(None, group=EXECUTION, help="DDP processes for --multi-gpu (default: one per GPU; gloo "
                               "on a CPU machine)")  # fmt: skip
    sync_bn: bool = option(False, "--sync-bn", "--sync_bn", group=EXECUTION, help="SyncBatchNorm under DDP (GPU only; "
                           "switched on by itself for a micro-batch of 1)")  # fmt: skip
    batch_per_gpu: bool = option(False, "--batch-per-gpu", "--batch_per_gpu", group=EXECUTION,
                                 help="DDP: --batch-size per process (global batch x processes; lr not rescaled). "
                                 "Default: the global batch --batch-size x --gradient-accumulation-steps is split "
                                 "over the processes")  # fmt: skip
    data_path: str = option("auto", "--data-path", "--data_path", group=EXECUTION, choices=("auto", "device", "loader"),
                            help="device: volumes held beside the model, batches gathered by index; loader: the "
                            "DataLoader (default auto: device on a GPU, loader on the CPU)")  # fmt: skip
    channels_last: bool | None = option(None, off=["--no-channels-last"], group=EXECUTION,
                                        help="channels_last_3d memory format (default on for CUDA)")  # fmt: skip
    compile: bool = option(False, group=EXECUTION, help="torch.compile the model")
    amp: bool | None = option(None, off=["--no-amp"], group=EXECUTION, help="mixed precision (default: on for CUDA)")
    tf32: bool = option(True, off=["--no-tf32"], group=EXECUTION)
    num_workers: int | None = option(None, "--num-workers", "--num_workers", group=EXECUTION,
                                     help="DataLoader workers (default min(8, cpus))")  # fmt: skip
    seed: int = option(42, group=EXECUTION)
    # resolve(): results/<network_name(model, depth)> unless given
    output_dir: str = option("results/ResNet50-3D", "--output-dir", "--output_dir", group=FILES,
                             help="default results/<network>: results/ResNet50-3D (final), results/ResNet10-3D "
                             "(cpu-demo), ...")  # fmt: skip
    plots_every: int = option(1, "--plots-every", "--plots_every", group=FILES,
                              help="per-epoch plots every N epochs and at each new best; 0: none, the final plots only")
    tensorboard: bool = option(True, "--no-tensorboard", const=False, group=FILES, help="no TensorBoard event files")
    mlflow: str | None = option(None, group=FILES, nargs="?", const="default", metavar="URI",
                                help="also log to MLflow (default store: <output-dir>/mlruns; or a tracking server "
                                "URI)")  # fmt: skip
    resume: str | None = option(None, group=FILES, train_only=True,
                                help="RUN_DIR of an interrupted run to continue from its last.pt")  # fmt: skip
    preset: str = option("final", group=PROTOCOL, choices=PRESETS, help="configuration preset (default: final)")
    # what the plan changed of a default or preset value the cohort cannot hold, and why (training/plan.py)
    adaptations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that decide what a run computes (compared when resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


# What the configuration needs of a network: its name (`display`), the defaults that replace the presets' for it, and
# its own check. Every entry of the architecture table (networks/registry.py, ArchSpec) carries these fields, and the
# table registers itself in CHOICES["model"]; the two built-in networks' are here, the registry's source for them, and
# the fallback where the table is not loaded (a command that imports no network).
@dataclass(frozen=True)
class NetworkRules:
    """`display(description)` -> results/<name>; `config_defaults`: values that replace the preset's (and the
    dataclass's) unless a config file or a flag gives them; `check(cfg)` -> one line, or None."""

    display: Callable[[Mapping], str] | None = None
    config_defaults: Mapping[str, object] = field(default_factory=dict)
    check: Callable[[TrainConfig], str | None] | None = None


def resnet3d_display(desc: Mapping) -> str:
    return f"ResNet{desc['depth']}-3D"


def mil2d_display(desc: Mapping) -> str:
    return f"MIL2D-ResNet{desc['depth']}"


def check_resnet3d(cfg: TrainConfig) -> str | None:
    if cfg.depth not in (10, 18, 34, 50, 101, 152, 200):
        return f"--depth {cfg.depth} is not a ResNet-3D depth"
    return None


def check_mil2d(cfg: TrainConfig) -> str | None:
    checks = (
        (cfg.depth in (18, 34), f"--model mil2d: --depth {cfg.depth} is not a 2D ResNet depth (18 or 34)"),
        (cfg.mil_k >= 1 and cfg.mil_min_gap >= 0, "--mil-k must be >= 1 and --mil-min-gap >= 0"),
        (cfg.mil_pooling in ("attention", "mean", "max"), f"--mil-pooling {cfg.mil_pooling!r} is not known"),
        (cfg.mil_k <= cfg.size, f"--mil-k {cfg.mil_k} exceeds the {cfg.size} axial slices of a volume"),
        (cfg.mil_entropy_modality in (None, *cfg.modalities),
         f"--mil-entropy-modality {cfg.mil_entropy_modality!r} is not one of the input modalities {cfg.modalities}"),
    )  # fmt: skip
    return next((message for ok, message in checks if not ok), None)


# --model mil2d: the 3D fields whose preset (or dataclass) value, a 3D ResNet's, gives way to the 2D model's
MIL_DEFAULTS = {"depth": 18}
BUILTIN_NETWORKS = {
    "resnet3d": NetworkRules(resnet3d_display, {}, check_resnet3d),
    "mil2d": NetworkRules(mil2d_display, MIL_DEFAULTS, check_mil2d),
}


def network_rules(model: str):
    """The network's entry of the architecture table (an ArchSpec), else its built-in rules, else None."""
    table = CHOICES.get("model", ("", {}))[1]
    return table.get(model) or BUILTIN_NETWORKS.get(model)


def network_name(model: str, depth: int) -> str:
    """How a network names itself in results folders and report headers: ResNet50-3D, MIL2D-ResNet18, ViT-B16-3D
    (the table's `display`; a name no table holds: itself)."""
    rules = network_rules(model)
    return rules.display({"model": model, "depth": depth}) if rules and rules.display else str(model)


def default_output_dir(model: str, depth: int) -> str:
    """The results folder of a configuration that names none: results/<network> (the seeds': results/ResNet50-3D)."""
    return f"results/{network_name(model, depth)}"


def target_suffix(target: str | None) -> str:
    """What a results folder adds for a cohort's own question, so that two questions never share a folder:
    "" for the seeds' (the grade), "-IDH" for --target IDH. The column alone names it (`predict --target IDH` finds
    it without --positive; two positives of one column would meet there, and `summarize` refuses runs whose
    --positive differs)."""
    if target is None or re.sub(r"[\s_\-/]", "", target).lower() == "grade":
        return ""
    return "-" + re.sub(r"[^A-Za-z0-9.]+", "-", target).strip("-")


def load_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    text = resources.files("gliograde").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_modalities(value) -> list[str]:
    """'flair' | 'all' | 't1,t1ce' | list -> checked list in the order given."""
    items = value if isinstance(value, list) else [v.strip().lower() for v in str(value).split(",") if v.strip()]
    if items == ["all"]:
        return list(MODALITIES)
    bad = [m for m in items if m not in MODALITIES]
    if bad or not items or len(set(items)) != len(items):
        raise ConfigError(f"--modality {value!r}: give one of {', '.join(MODALITIES)}, 'all', or a comma list of them")
    return items


# the seeds' flag spellings of keys that a configuration file spells otherwise (suggested, not accepted)
KEY_SPELLINGS = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "early_stopping": "patience",
    "modality": "modalities",
    "num_folds": "folds",
    "k": "folds",
    "multi-gpu": "multi_gpu",
}


def load_config_file(path: str | Path) -> dict:
    """A YAML file of configuration keys (the presets' keys); an unknown key is an error that suggests the closest
    valid one."""
    import difflib

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of configuration keys, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in names:
            close = [KEY_SPELLINGS[key]] if key in KEY_SPELLINGS else difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
    if "preset" in values:
        raise ConfigError(f"--config {path}: 'preset' is chosen with --preset, not in the file")
    return values


def resolve_with_sources(
    preset: str = "final", config_file: str | Path | None = None, **overrides
) -> tuple[TrainConfig, dict[str, str]]:
    """Defaults < preset < config file < overrides (None values in overrides mean 'not given'); also returns where
    each value came from (default | preset NAME | file PATH | command line | default (mil2d)).

    The presets describe the 3D ResNet: a network's own `config_defaults` replace their values (mil2d: the depth 18
    for the preset's 10 or 50; MONAI's networks: no MedicalNet file); only a config file or the command line sets
    those fields for that network."""
    layers = [(f"preset {preset}", load_preset(preset))]
    if config_file is not None:
        layers.append((f"file {config_file}", load_config_file(config_file)))
    layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values, sources = {}, {name: "default" for name in names}
    for source, layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        values.update(layer)
        sources.update({k: source for k in layer})
    model = values.get("model", TrainConfig.model)
    rules = network_rules(model)
    # the presets describe the 3D ResNet: their depth (or MedicalNet file) does not carry over to another network (a
    # value asked for in a config file or on the command line does, and is validated)
    for key, value in (rules.config_defaults if rules else {}).items():
        if not sources[key].startswith(("file ", "command line")):
            values[key], sources[key] = value, f"default ({model})"
    values["preset"], sources["preset"] = preset, "--preset" if overrides.get("preset") else "default"
    if sources["output_dir"] == "default":  # the folder follows the network, never another network's name
        model, depth = values.get("model", TrainConfig.model), values.get("depth", TrainConfig.depth)
        values["output_dir"] = default_output_dir(model, depth) + target_suffix(values.get("target"))
        sources["output_dir"] = "default for the network"
    cfg = TrainConfig(**values)
    cfg.modalities = parse_modalities(cfg.modalities)
    cfg.loss, cfg.optimizer, cfg.scheduler = cfg.loss.lower(), cfg.optimizer.lower(), cfg.scheduler.lower()
    return cfg, sources


def resolve(preset: str = "final", config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults < preset < config file < overrides (None values in overrides mean 'not given')."""
    return resolve_with_sources(preset, config_file, **overrides)[0]


def check_config(cfg: TrainConfig, log: logging.Logger | None = None) -> TrainConfig:
    """Errors for values that cannot work, warnings for the seeds' known pitfalls."""
    log = log or logging.getLogger("gliograde")

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"--gradient-accumulation-steps must be at least 1, got {cfg.grad_accum}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.classifier_lr_mult > 0, f"--classifier-lr-mult must be positive, got {cfg.classifier_lr_mult}")
    # fine-tuning: --lr is the backbone's rate and the head's is lr x --classifier-lr-mult, in every run; --probe
    # gives the backbone no rate at all, so the options that set one (its decay by layer, its start after N
    # epochs) contradict it
    need(0 < cfg.layer_decay <= 1, f"--layer-decay must lie in (0, 1] (1 = off), got {cfg.layer_decay}")
    need(cfg.freeze_epochs >= 0, f"--freeze-epochs must be >= 0, got {cfg.freeze_epochs}")
    need(cfg.freeze_epochs < cfg.epochs, f"--freeze-epochs {cfg.freeze_epochs} must be below --epochs {cfg.epochs}: "
         "the backbone would never train (a backbone frozen for the whole run is --probe)")  # fmt: skip
    for value, flag in ((cfg.layer_decay != 1, "--layer-decay"), (cfg.freeze_epochs > 0, "--freeze-epochs")):
        need(not (cfg.probe and value), f"--probe freezes the backbone for the whole run: {flag} gives it a "
             "learning rate; drop one of the two (the head's rate is --lr x --classifier-lr-mult)")  # fmt: skip
    need(0 <= cfg.dropout < 1, f"--dropout must lie in [0, 1), got {cfg.dropout}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(0 <= cfg.ema_decay < 1, f"--ema-decay must lie in [0, 1) (0 = off), got {cfg.ema_decay}")
    for key, (what, table) in CHOICES.items():
        value = getattr(cfg, key)
        if value is None and TrainConfig.__dataclass_fields__[key].default is None:
            continue  # a field whose default is none (--pretrained-format: recognised from the file)
        need(value in table, unknown_name(f"--{key.replace('_', '-')}", value, table, what))
    need(cfg.optimizer in ("adam", "adamw", "sgd"), f"--optimizer {cfg.optimizer!r} is not adam, adamw or sgd")
    need(cfg.scheduler in ("cosine", "step", "none"), f"--scheduler {cfg.scheduler!r} is not cosine, step or none")
    need(cfg.sampler in ("weighted", "shuffle"), f"--sampler {cfg.sampler!r} is neither weighted nor shuffle")
    need(cfg.layout in ("strided", "medicalnet"), f"--layout {cfg.layout!r} is neither strided nor medicalnet")
    need(cfg.size >= 16, f"--size must be at least 16, got {cfg.size}")
    rules = network_rules(cfg.model)  # the network's own checks (the table's `check`): depth, patch and size
    problem = rules.check(cfg) if rules and rules.check else None
    need(problem is None, problem)
    need(cfg.patience >= 1 and cfg.min_epochs >= 0, "--early-stopping must be >= 1 and --min-epochs >= 0")
    need(cfg.max_m > 0 and cfg.ldam_s > 0, "--max-m and --ldam-s must be positive")
    need(cfg.warmup_epochs >= 0 and cfg.plots_every >= 0, "--warmup-epochs and --plots-every must be >= 0")
    need(cfg.data_path in ("auto", "device", "loader"), f"--data-path {cfg.data_path!r} is not auto, device or loader")
    need(cfg.device in ("auto", "cuda", "cpu"), f"--device {cfg.device!r} is not auto, cuda or cpu")
    need(
        cfg.precision in ("auto", "bf16", "fp16", "fp32"),
        f"--precision {cfg.precision!r} is not auto, bf16, fp16 or fp32",
    )
    need(not (cfg.gpu and cfg.device == "cpu"), "--gpu together with --device cpu")
    need(cfg.nproc is None or cfg.nproc >= 1, f"--nproc must be at least 1, got {cfg.nproc}")
    if cfg.folds is not None:
        need(cfg.folds >= 2, f"--folds must be at least 2, got {cfg.folds}")
        need(0 <= cfg.fold < cfg.folds, f"--fold {cfg.fold} is outside 0..{cfg.folds - 1}")
    need(cfg.fold >= 0, f"--fold must be >= 0, got {cfg.fold}")
    need(cfg.repeats is None or cfg.repeats >= 1, f"--repeats must be at least 1, got {cfg.repeats}")
    need(cfg.repeat >= 0 and (cfg.repeats is None or cfg.repeat < cfg.repeats), f"--repeat {cfg.repeat} is outside "
         f"0..{(cfg.repeats or 1) - 1}")  # fmt: skip
    need(cfg.group_by in (None, "site"), f"--group-by {cfg.group_by!r}: only 'site' is known")
    need(cfg.inner_fraction is None or 0 < cfg.inner_fraction < 1, "--inner-fraction must be between 0 and 1")
    need(cfg.selection in ("inner", "outer"), f"--selection {cfg.selection!r} is neither inner nor outer")
    t = cfg.threshold_at_specificity
    need(t is None or 0 < t < 1, f"--threshold-at-specificity must be between 0 and 1, got {t}")
    need(
        cfg.selection == "inner" or (t is None and not cfg.temperature),
        "--threshold-at-specificity and --temperature are chosen on the selection part: they need --selection inner",
    )

    if cfg.loss == "ldam" and cfg.drw_start_epoch is not None:
        if cfg.drw_start_epoch > cfg.epochs:
            log.warning(
                "DRW will never activate: --drw-start-epoch %d is beyond --epochs %d", cfg.drw_start_epoch, cfg.epochs
            )
        elif cfg.drw_start_epoch > cfg.min_epochs + cfg.patience:
            log.warning(
                "DRW may never activate: early stopping can end the run at epoch %d (min epochs %d + "
                "patience %d), before --drw-start-epoch %d",
                cfg.min_epochs + cfg.patience,
                cfg.min_epochs,
                cfg.patience,
                cfg.drw_start_epoch,
            )
    if cfg.loss == "ldam" and cfg.sampler == "weighted":
        log.warning(
            "LDAM loss together with the class-balanced sampler: the 'triple balancing' conflict of "
            "training_journey_summary.md §2.1; consider --sampler shuffle (preset ldam-drw) or --loss ce"
        )
    if cfg.freeze_epochs > 0 and cfg.freeze_epochs + 1 > cfg.min_epochs + cfg.patience:
        log.warning(
            "The backbone may never be unfrozen: early stopping can end the run at epoch %d (min epochs %d + "
            "patience %d), before --freeze-epochs %d ends",
            cfg.min_epochs + cfg.patience, cfg.min_epochs, cfg.patience, cfg.freeze_epochs,
        )  # fmt: skip
    if cfg.warmup_epochs >= cfg.epochs:
        log.warning(
            "--warmup-epochs %d >= --epochs %d: the learning rate never reaches its peak", cfg.warmup_epochs, cfg.epochs
        )
    return cfg


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration a run was trained with (its config/config.json)."""
    path = Path(run_dir) / "config" / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a gliograde run folder (no config/config.json)")
    try:
        values = json.loads(path.read_text())["config"]
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in values.items() if k in names})
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} cannot be read as a run configuration ({type(e).__name__}: {e})") from e


def with_split(cfg: TrainConfig, folds: dict) -> TrainConfig:
    """cfg with the split settings of the saved folds.json filled in (the persisted split is the truth), and the
    fold and repeat checked against it."""
    out = dataclasses.replace(
        cfg,
        folds=folds["k"],
        split_seed=folds["seed"],
        repeats=folds.get("repeats", 1),
        group_by=folds.get("group_by"),
        leave_site_out=folds.get("leave_site_out", False),
        inner_fraction=folds.get("inner_fraction"),
    )
    if not 0 <= out.fold < out.folds:
        raise ConfigError(f"--fold {out.fold} is outside 0..{out.folds - 1} (the saved split has {out.folds} folds)")
    if not 0 <= out.repeat < out.repeats:
        raise ConfigError(f"--repeat {out.repeat} is outside 0..{out.repeats - 1} (the saved split has {out.repeats})")
    return out


def parse_fold_list(spec: str | None, k: int, k_from: str = "") -> list[int]:
    """'0-4', '0,2,4', '1-3,5' -> sorted fold numbers; None -> all K folds. `k_from`: where K came from, for the
    message (the saved split, --folds, the default)."""
    if spec is None:
        return list(range(k))
    folds: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi or lo)
            if hi < lo:
                raise ValueError
            folds.update(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(f"--only {spec!r}: give folds like 0-4, 0,2,4 or 1-3,5 (ranges low-high)") from None
    bad = sorted(f for f in folds if not 0 <= f < k)
    if bad or not folds:
        where = f"K = {k}, {k_from}" if k_from else f"K = {k}"
        raise ConfigError(f"--only {spec!r}: folds {bad} are outside 0..{k - 1} ({where})")
    return sorted(folds)
