"""The training configuration: one dataclass, presets as YAML (configs/ = src/gliograde/presets/), validation.

Resolution order: dataclass defaults < preset file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from gliograde import MODALITIES
from gliograde.errors import GliogradeError

PRESETS = ("final", "ldam-drw", "cpu-demo")
# Fields that change how a run is executed or reported, not what it computes: a resumed run may differ in these.
RUNTIME_FIELDS = {
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
}


class ConfigError(GliogradeError):
    """A value that makes no sense, explained."""


@dataclass
class TrainConfig:
    # data
    data_root: str | None = None
    cache_dir: str = "cache"
    size: int = 128
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    fold: int = 0
    # the split (folds.json): None = "not asked", taken from the saved split (defaults when one is made:
    # 5 folds, seed 42, 1 repeat, no grouping, 20 % inner selection part); see data/splits.py
    folds: int | None = None  # K
    split_seed: int | None = None  # seed of the fold split; independent of the training seed
    repeats: int | None = None
    repeat: int = 0  # the repeat this run's fold belongs to
    group_by: str | None = None  # site: StratifiedGroupKFold, no site in two folds
    leave_site_out: bool | None = None
    inner_fraction: float | None = None
    # the protocol: inner = early stopping, checkpoint, threshold and calibration chosen on the selection part of the
    # training patients, the outer fold scored once at the end; outer = the seeds' (chosen on the reported fold)
    selection: str = "inner"
    threshold_at_specificity: float | None = None  # None: Youden's J on the selection part
    temperature: bool = False  # fit a temperature on the selection part (after the prior correction)
    # model
    model: str = "resnet3d"  # resnet3d (MedicalNet ResNet-3D) | mil2d (2D MIL over entropy-selected axial slices)
    mil_k: int = 16  # mil2d: slices per case
    mil_pooling: str = "attention"  # mil2d: attention (gated, Ilse et al. 2018) | mean | max
    mil_min_gap: int = 0  # mil2d: minimum distance between selected slices
    mil_entropy_modality: str | None = None  # mil2d: rank slices on this modality's entropy; None: mean over all
    depth: int = 50
    layout: str = "strided"
    shortcut: str = "B"
    dropout: float = 0.4
    pretrained_path: str | None = None
    # optimisation
    epochs: int = 50
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adam"
    lr: float = 1e-4
    classifier_lr_mult: float = 2.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 3
    step_size: int = 10
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # class imbalance
    loss: str = "ce"
    sampler: str = "weighted"  # weighted (inverse class frequency) | shuffle
    max_m: float = 0.5
    ldam_s: float = 30.0
    drw_start_epoch: int | None = None  # 1-based epoch from which DRW weights apply (LDAM only)
    # averaging and stopping
    ema_decay: float = 0.0  # 0 = off
    patience: int = 10
    min_epochs: int = 15
    min_delta: float = 0.0
    # augmentation (batched, applied identically to all channels)
    augment: bool = True
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale_range: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    # execution
    gpu: bool = False  # the seeds' --gpu: the same as --device cuda
    device: str = "auto"  # auto (the GPU where CUDA works) | cuda | cpu
    precision: str = "auto"  # auto (bf16 on compute capability >= 8.0, else fp16; fp32 on the CPU) | bf16 | fp16 | fp32
    multi_gpu: bool = False
    nproc: int | None = None  # DDP processes for --multi-gpu (default: one per visible GPU)
    sync_bn: bool = False  # SyncBatchNorm under DDP (GPU only; switched on by itself for a micro-batch of 1)
    # DDP: batch_size x grad_accum is the global batch, split over the processes; True: batch_size per process
    # (the global batch grows with the GPUs; the learning rate is not rescaled)
    batch_per_gpu: bool = False
    data_path: str = "auto"  # auto (device on a GPU, loader on the CPU) | device | loader
    channels_last: bool | None = None  # channels_last_3d memory format; None = on for CUDA
    compile: bool = False  # torch.compile the model
    amp: bool | None = None  # None = on for CUDA, off on CPU
    tf32: bool = True
    num_workers: int | None = None  # None = min(8, cpus)
    seed: int = 42
    output_dir: str = "results/ResNet50-3D"
    plots_every: int = 1
    tensorboard: bool = True  # event files in run_dir/tensorboard/
    mlflow: str | None = None  # MLflow tracking URI; "default" = a file store at <output_dir>/mlruns; None = off
    resume: str | None = None
    preset: str = "final"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that decide what a run computes (compared when resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


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


# --model mil2d: the 3D fields whose preset (or dataclass) value, a 3D ResNet's, gives way to the 2D model's
MIL_DEFAULTS = {"depth": 18}


def resolve_with_sources(
    preset: str = "final", config_file: str | Path | None = None, **overrides
) -> tuple[TrainConfig, dict[str, str]]:
    """Defaults < preset < config file < overrides (None values in overrides mean 'not given'); also returns where
    each value came from (default | preset NAME | file PATH | command line | default (mil2d)).

    With model mil2d, the depth of the preset or the defaults (a 3D ResNet's: 10 or 50) becomes MIL_DEFAULTS' 18;
    only a config file or the command line sets the depth of a mil2d model."""
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
    if values.get("model") == "mil2d":
        # the presets describe the 3D family: their depth does not carry over to the 2D model (a depth asked for in
        # a config file or on the command line does, and is validated)
        for key, value in MIL_DEFAULTS.items():
            if not sources[key].startswith(("file ", "command line")):
                values[key], sources[key] = value, "default (mil2d)"
    values["preset"], sources["preset"] = preset, "--preset" if overrides.get("preset") else "default"
    cfg = TrainConfig(**values)
    cfg.modalities = parse_modalities(cfg.modalities)
    cfg.loss, cfg.optimizer, cfg.scheduler = cfg.loss.lower(), cfg.optimizer.lower(), cfg.scheduler.lower()
    return cfg, sources


def resolve(preset: str = "final", config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults < preset < config file < overrides (None values in overrides mean 'not given')."""
    return resolve_with_sources(preset, config_file, **overrides)[0]


def validate(cfg: TrainConfig, log: logging.Logger | None = None) -> TrainConfig:
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
    need(0 <= cfg.dropout < 1, f"--dropout must lie in [0, 1), got {cfg.dropout}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(0 <= cfg.ema_decay < 1, f"--ema-decay must lie in [0, 1) (0 = off), got {cfg.ema_decay}")
    need(cfg.loss in ("ce", "ldam"), f"--loss {cfg.loss!r} is neither ce nor ldam")
    need(cfg.optimizer in ("adam", "adamw", "sgd"), f"--optimizer {cfg.optimizer!r} is not adam, adamw or sgd")
    need(cfg.scheduler in ("cosine", "step", "none"), f"--scheduler {cfg.scheduler!r} is not cosine, step or none")
    need(cfg.sampler in ("weighted", "shuffle"), f"--sampler {cfg.sampler!r} is neither weighted nor shuffle")
    need(cfg.layout in ("strided", "medicalnet"), f"--layout {cfg.layout!r} is neither strided nor medicalnet")
    need(cfg.model in ("resnet3d", "mil2d"), f"--model {cfg.model!r} is neither resnet3d nor mil2d")
    if cfg.model == "mil2d":
        need(cfg.depth in (18, 34), f"--model mil2d: --depth {cfg.depth} is not a 2D ResNet depth (18 or 34)")
        need(cfg.mil_k >= 1 and cfg.mil_min_gap >= 0, "--mil-k must be >= 1 and --mil-min-gap >= 0")
        need(cfg.mil_pooling in ("attention", "mean", "max"), f"--mil-pooling {cfg.mil_pooling!r} is not known")
        need(cfg.mil_k <= cfg.size, f"--mil-k {cfg.mil_k} exceeds the {cfg.size} axial slices of a volume")
        need(
            cfg.mil_entropy_modality in (None, *cfg.modalities),
            f"--mil-entropy-modality {cfg.mil_entropy_modality!r} is not one of the input modalities {cfg.modalities}",
        )
    else:
        need(cfg.depth in (10, 18, 34, 50, 101, 152, 200), f"--depth {cfg.depth} is not a ResNet-3D depth")
    need(cfg.size >= 16, f"--size must be at least 16, got {cfg.size}")
    need(cfg.patience >= 1 and cfg.min_epochs >= 0, "--early-stopping must be >= 1 and --min-epochs >= 0")
    need(cfg.max_m > 0 and cfg.ldam_s > 0, "--max-m and --ldam-s must be positive")
    need(cfg.warmup_epochs >= 0 and cfg.plots_every >= 1, "--warmup-epochs must be >= 0 and --plots-every >= 1")
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


def split_spec(cfg: TrainConfig):
    """What the configuration asks of the split (None: not asked; the saved folds.json decides)."""
    from gliograde.data.splits import SplitSpec

    return SplitSpec(cfg.folds, cfg.split_seed, cfg.repeats, cfg.group_by, cfg.leave_site_out, cfg.inner_fraction)


def parse_fold_list(spec: str | None, k: int) -> list[int]:
    """'0-4', '0,2,4', '1-3,5' -> sorted fold numbers; None -> all K folds."""
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
        raise ConfigError(f"--only {spec!r}: folds {bad} are outside 0..{k - 1} (K = {k}, set by --folds)")
    return sorted(folds)
