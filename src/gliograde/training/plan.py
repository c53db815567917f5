"""Plan before working, as nnU-Net plans before it trains: what `cv` or `train` will do, decided from the case list
and the saved split before any case is preprocessed and before any run folder exists.

Checked, in this order: the device and the pretrained weights asked for; the cache (its size); the number of folds
against each grade's count; the global batch against the training cases of the smallest fold. A value the user did
not set (a default, a preset's) that the cohort cannot hold is adapted, said in a warning and recorded in every
run's config.json (`adaptations`); a value the user set (a flag, a --config file) that cannot work is refused in
one line that says what to pass.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from gliograde.config import ConfigError, TrainConfig, check_config, parse_fold_list
from gliograde.data.splits import split_spec

log = logging.getLogger("gliograde")
_QUIET = logging.getLogger("gliograde.plan.quiet")  # check_config's warnings, where the trainer says them anyway
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def explicit_fields(sources: dict[str, str] | None) -> set[str] | None:
    """The configuration keys the user set (on the command line or in a --config file), from resolve_with_sources'
    sources; None (no sources: a library call) means every value is meant as given, none adapted."""
    if sources is None:
        return None
    return {k for k, where in sources.items() if where == "command line" or where.startswith("file ")}


@dataclass
class RunPlan:
    cfg: TrainConfig  # adapted where needed, the split's settings filled in, `adaptations` recorded
    folds: list[int]  # the folds to train
    k_from: str  # where K came from, for messages
    split: dict  # the folds document the cache will hold


def plan_run(
    cfg: TrainConfig, explicit: set[str] | None = None, only: str | list[int] | None = None, warn: bool = True
) -> RunPlan:
    """The plan of a `cv` (folds `only`, default all) or a `train` (only=[cfg.fold]): nothing is written.
    `warn`: say check_config's warnings (False where train_fold says them next)."""
    check_config(cfg, log if warn else _QUIET)
    check_runtime(cfg)
    explicit = set(dataclasses.asdict(cfg)) if explicit is None else explicit
    notes: list[str] = []
    cfg, split = _plan_split(cfg, explicit, notes)
    k = split.folds["k"]
    folds = list(only) if isinstance(only, list) else parse_fold_list(only, k, split.source)
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        raise ConfigError(f"--fold {bad[0]} is outside 0..{k - 1} (K = {k}, {split.source})")
    cfg = _plan_batch(cfg, explicit, split.folds, folds, notes)
    for note in notes:
        log.warning("adapted to the cohort: %s", note)
    cfg = dataclasses.replace(cfg, adaptations=notes)
    return RunPlan(cfg, folds, split.source, split.folds)


def check_runtime(cfg: TrainConfig) -> None:
    """The device and the pretrained weights: refused here, before any cache or run folder is made."""
    from gliograde import runtime
    from gliograde.networks import get_architecture

    runtime.pick_device("cuda" if cfg.gpu else cfg.device)
    check_weights = get_architecture(cfg.model).check_weights  # ResNet-3D: a MedicalNet file the user gave exists
    if check_weights and cfg.pretrained_path and not cfg.resume:
        check_weights(cfg.pretrained_path)


@dataclass
class Preview:
    """What `cv --dry-run` says it would train: the folds, K, the repeats and where the split comes from."""

    cfg: TrainConfig
    folds: list[int] | str  # "all" where K is the number of sites, known once the split is made
    k: int | str
    repeats: int
    where: str


def preview_cv(cfg: TrainConfig, explicit: set[str] | None, only: str | None) -> Preview:
    """The plan of a `cv`, as the real run plans it (`plan_run`: K and the batch adapted to the cohort, the saved
    folds.json taken as it is), reading only headers, tables and folds.json; where neither the cache nor the data
    root is there yet, the configuration's own values (no cohort to plan against)."""
    from gliograde.data.brats import resolve_data_root
    from gliograde.data.cache import MANIFEST
    from gliograde.data.splits import DEFAULTS
    from gliograde.errors import DataError

    reachable = (Path(cfg.cache_dir) / MANIFEST).is_file() or (cfg.cohort is not None and Path(cfg.cohort).is_file())
    if not reachable:
        try:
            resolve_data_root(cfg.data_root)
            reachable = True
        except DataError:
            pass
    if reachable:
        plan = plan_run(cfg, explicit, only)
        return Preview(plan.cfg, plan.folds, plan.cfg.folds, plan.cfg.repeats, plan.k_from)
    check_config(cfg, log)
    where = "a new split (no data found to plan against: the real run plans from the cases it finds)"
    repeats = cfg.repeats or DEFAULTS["repeats"]
    if cfg.leave_site_out and cfg.folds is None:  # K = the number of sites, known once the split is made
        return Preview(cfg, only or "all", "the number of sites", repeats, where)
    k = cfg.folds or DEFAULTS["k"]
    return Preview(cfg, parse_fold_list(only, k), k, repeats, where)


# ------------------------------------------------------------------------------------------------ the split
def _plan_split(cfg: TrainConfig, explicit: set[str], notes: list[str]):
    """(cfg with its size and split settings settled, the SplitPlan), reading only headers, tables and folds.json."""
    from gliograde.data.cache import MANIFEST, open_cache, other_caches, target_params
    from gliograde.data.cohort import CohortSource
    from gliograde.data.source import cache_path_for
    from gliograde.data.splits import FOLDS_FILE, load_folds, plan_split

    direct = Path(cfg.cache_dir)
    if (direct / MANIFEST).is_file():  # one cache named: its table, no scan
        cache = open_cache(direct)
        cfg = _cache_size(cfg, cache, explicit, notes)
        path, ids, labels, sites = direct, cache.ids, cache.labels, [c.site for c in cache.cases]
        patients, target, others = cache.patients, cache.target, []
    else:
        found = CohortSource.from_config(cfg).discover()  # every file's header read: a bad file is named now
        path = cache_path_for(found, cfg.size, cfg.cache_dir)
        ids, labels, sites = [c.id for c in found.cases], [c.label for c in found.cases], [c.site for c in found.cases]
        patients, target = [c.patient for c in found.cases], found.target
        others = (
            []
            if (path / MANIFEST).is_file()
            else other_caches(found.root, cfg.cache_dir, cfg.size, target_params(found))
        )
    saved = (path / FOLDS_FILE, load_folds(path / FOLDS_FILE)) if (path / FOLDS_FILE).is_file() else None
    if saved is None and others:
        saved = _other_size(cfg, explicit, others[0], path)
    split = plan_split(ids, labels, sites, split_spec(cfg), saved, patients=patients, classes=target.classes,
                       stratified_by=target.column)  # fmt: skip
    notes += split.notes
    s = split.spec
    cfg = dataclasses.replace(cfg, folds=s.k, split_seed=s.seed, repeats=s.repeats, group_by=s.group_by,
                              leave_site_out=s.leave_site_out, inner_fraction=s.inner_fraction)  # fmt: skip
    return cfg, split


def _cache_size(cfg: TrainConfig, cache, explicit: set[str], notes: list[str]) -> TrainConfig:
    """--cache-dir names one cache: its size is the input size, unless --size (or a --config file) says otherwise."""
    if cache.size == cfg.size:
        return cfg
    if "size" in explicit:
        raise ConfigError(
            f"--size {cfg.size}, but --cache-dir {cache.path} holds {cache.size}^3 volumes: pass --size {cache.size} "
            f"to train on it, or a --cache-dir folder of caches to prepare one at {cfg.size}^3"
        )
    notes.append(f"--cache-dir {cache.path} holds {cache.size}^3 volumes: size {cache.size} (not {cfg.size})")
    return dataclasses.replace(cfg, size=cache.size)


def _other_size(cfg: TrainConfig, explicit: set[str], other: Path, path: Path):
    """A cache of the same cases at another size is named, never silently duplicated: the new cache at cfg.size
    takes over its split (the folds are a property of the patients, as nnU-Net's splits_final.json serves every
    configuration of a data set). Returns (its folds.json, the folds), or None where it has none."""
    from gliograde.data.splits import FOLDS_FILE, check_asked, load_folds
    from gliograde.errors import DataError

    given = "--size" if "size" in explicit else f"the {cfg.preset} preset's size"
    folds = other / FOLDS_FILE
    log.warning(
        "%s holds these cases at another size; %s is %d, so %s is prepared at %d^3 beside it%s (pass --size %s to "
        "train on %s instead)", other, given, cfg.size, path, cfg.size,
        " with the same split" if folds.is_file() else "", other.name.rsplit("-s", 1)[-1], other.name,
    )  # fmt: skip
    if not folds.is_file():
        return None
    try:
        saved = (folds, load_folds(folds))
        check_asked(saved[1], split_spec(cfg), folds)
    except DataError as e:  # unreadable, or another split asked for: a new one is made
        log.warning("its split is not taken over: %s", e)
        return None
    return saved


# ------------------------------------------------------------------------------------------------ the batch
def _plan_batch(cfg: TrainConfig, explicit: set[str], split: dict, folds: list[int], notes: list[str]) -> TrainConfig:
    """The global batch (batch x accumulation) must not exceed the training cases of any fold to run. Not set by the
    user: made a batch of about half the smallest training part, so that an epoch has two optimizer steps at least
    (nnU-Net caps its batch by the data set's size in the same spirit); set by the user: refused, saying what to
    pass (an accumulation the user did not set gives way to a batch the user did)."""
    part = "fit" if cfg.selection == "inner" else "train"
    sizes = {(r, f): len(_entry(split, r, f).get(part) or _entry(split, r, f)["train"])
             for r in range(split.get("repeats", 1)) for f in folds}  # fmt: skip
    (repeat, fold), n = min(sizes.items(), key=lambda item: (item[1], item[0]))
    batch, accum = cfg.batch_size, cfg.grad_accum
    if batch * accum <= n:
        return cfg
    where = f"fold {fold}" + (f" of repeat {repeat}" if repeat else "")
    kept = f", {split['inner_fraction']:.0%} of each training part kept for selection" if part == "fit" else ""
    held = f"the {n} training cases of {where} ({len(split['case_ids'])} cases in {split['k']} folds{kept})"
    if "batch_size" in explicit:
        if "grad_accum" in explicit or batch > n:
            what = f"--batch-size {batch}" + (f" x --gradient-accumulation-steps {accum}" if accum > 1 else "")
            fix = f"--batch-size {n // accum}" if n // accum >= 1 else "--gradient-accumulation-steps 1"
            raise ConfigError(f"{what} exceeds {held}: pass {fix} or less")
        new_batch, new_accum = batch, n // batch
    else:
        target = min(n, max(2, n // 2))
        new_accum = accum if "grad_accum" in explicit else 1
        new_batch = max(1, target // new_accum)
        if new_batch * new_accum > n:
            raise ConfigError(f"--gradient-accumulation-steps {accum} exceeds {held}: pass "
                              f"--gradient-accumulation-steps {n} or less")  # fmt: skip
    was = f"{batch}" + (f" x {accum} accumulation" if accum > 1 else "")
    now = f"{new_batch}" + (f" x {new_accum} accumulation" if new_accum > 1 else "")
    notes.append(f"{n} training cases in {where}: batch {now} (not {was})")
    return dataclasses.replace(cfg, batch_size=new_batch, grad_accum=new_accum)


def _entry(split: dict, repeat: int, fold: int) -> dict:
    return (split["repeat_sets"][repeat] if "repeat_sets" in split else split)["folds"][fold]
