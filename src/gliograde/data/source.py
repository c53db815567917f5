"""Where a run's volumes and folds come from: the cache named by --cache-dir, or one prepared from the data root.
Shared by training, `evaluate` and `cv`, so that all of them read the same persisted split; `prepare_and_split` is
`gliograde prepare` (and the demo's preparation): the split planned from the scan, the cache, the folds."""

from __future__ import annotations

import logging
from pathlib import Path

from gliograde.config import TrainConfig
from gliograde.data.brats import discover_cases, resolve_data_root
from gliograde.data.cache import MANIFEST, VolumeCache, default_cache_path, open_cache, other_caches, prepare_cache
from gliograde.data.splits import (
    FOLDS_FILE,
    SplitSpec,
    check_asked,
    describe,
    folds_for_cache,
    load_folds,
    plan_split,
    split_spec,
)
from gliograde.errors import DataError, GliogradeError

log = logging.getLogger("gliograde")


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
    return cache, folds_for_cache(cache, split_spec(cfg))


def prepare_and_split(data_root, out, size, workers, skip_incomplete, spec: SplitSpec | None = None):
    """plan + prepare + folds, logging what happened; returns (cache, folds). The split is planned from the scan,
    before any case is preprocessed (`plan_prepare`)."""
    spec = plan_prepare(data_root, out, size, skip_incomplete, spec)
    result = prepare_cache(data_root, out, size=size, workers=workers, skip_incomplete=skip_incomplete)
    log.info(result.discovery.report())
    if result.reused:
        log.info("cache %s is up to date (same parameters, unchanged sources): reused", result.path)
    else:
        log.info("prepared %d cases in %.1f s (%.2f cases/s) -> %s", result.n_cases, result.seconds,
                 result.cases_per_s, result.path)  # fmt: skip
        for cid, why in result.failed.items():
            log.warning("skipped %s: %s", cid, why)
    cache = open_cache(result.path)
    folds = folds_for_cache(cache, spec)
    log.info("folds: %s -> %s", describe(folds), cache.path / FOLDS_FILE)
    return cache, folds


def plan_prepare(data_root, out, size, skip_incomplete, spec: SplitSpec | None = None) -> SplitSpec:
    """The split the cache will hold, decided from the scan (every file's header read: a bad file is named now):
    the cache's saved folds.json; else that of a cache of the same cases at another size (named, its split taken
    over); else a new one, K adapted to the smaller grade where --folds was not given. Returns the SplitSpec to ask."""
    cases = discover_cases(data_root, skip_incomplete=skip_incomplete).cases
    spec = spec or SplitSpec()
    path = Path(out) if out is not None else default_cache_path(data_root, size)
    saved = (path / FOLDS_FILE, load_folds(path / FOLDS_FILE)) if (path / FOLDS_FILE).is_file() else None
    for other in [] if saved or (path / MANIFEST).is_file() else other_caches(data_root, path.parent, size):
        log.info("%s holds these cases at another size; %s is prepared at %d^3 beside it", other, path, size)
        try:
            saved = (other / FOLDS_FILE, load_folds(other / FOLDS_FILE))
            check_asked(saved[1], spec, saved[0])
            log.info("its split %s is taken over, so that both caches hold the same folds", saved[0])
            break
        except DataError:  # none, or another split asked for
            saved = None
    plan = plan_split([c.id for c in cases], [c.label for c in cases], [c.site for c in cases], spec, saved)
    for note in plan.notes:
        log.warning("adapted to the cohort: %s", note)
    return plan.spec
