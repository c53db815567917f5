"""Where a run's volumes and folds come from: the cache named by --cache-dir, or one prepared from the data root.
Shared by training, `evaluate` and `cv`, so that all of them read the same persisted split; `prepare_and_split` is
`gliograde prepare` (and the demo's preparation): the split planned from the scan, the cache, the folds."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from gliograde.config import TrainConfig
from gliograde.data.brats import Discovery
from gliograde.data.cache import (
    MANIFEST,
    VolumeCache,
    default_cache_path,
    open_cache,
    other_caches,
    prepare_cache,
    target_params,
)
from gliograde.data.cohort import CohortSource
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


def cache_path_for(found: Discovery, size: int, cache_dir: str | Path = "cache") -> Path:
    """Where the cache of these cases goes: cache/<data root or table name>[-<target>]-s<size> (a cohort table asked
    two questions keeps two caches, each with its labels)."""
    path = default_cache_path(found.table or found.root, size, cache_dir)
    if found.target.column == "grade":
        return path
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{found.target.column}-{found.target.positive}").strip("-").lower()
    return path.with_name(f"{path.name.rsplit('-s', 1)[0]}-{slug}-s{size}")


def load_data(cfg: TrainConfig) -> tuple[VolumeCache, dict]:
    """The cache (a folder given by --cache-dir, else prepared from the data root or the cohort table if missing or
    stale) and folds."""
    direct = Path(cfg.cache_dir)
    if (direct / "manifest.json").is_file():
        cache = open_cache(direct)
    else:
        found = CohortSource.from_config(cfg).discover()
        log.info("Preparing (or checking) the volume cache of %s ...", found.table or found.root)
        cache = open_cache(prepare_cache(found, cache_path_for(found, cfg.size, cfg.cache_dir), size=cfg.size).path)
    if cache.size != cfg.size:
        raise GliogradeError(f"cache {cache.path} holds {cache.size}^3 volumes, but --size is {cfg.size}")
    return cache, folds_for_cache(cache, split_spec(cfg))


def prepare_and_split(data_root, out, size, workers, skip_incomplete, spec: SplitSpec | None = None,
                      source: CohortSource | None = None):  # fmt: skip
    """plan + prepare + folds, logging what happened; returns (cache, folds). The split is planned from the scan,
    before any case is preprocessed (`plan_prepare`). `source`: a cohort table instead of the folder `data_root`."""
    found = (source or CohortSource(data_root)).discover(skip_incomplete=skip_incomplete)
    out = Path(out) if out is not None else cache_path_for(found, size)
    spec = plan_prepare(found, out, size, spec)
    result = prepare_cache(found, out, size=size, workers=workers, skip_incomplete=skip_incomplete)
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


def plan_prepare(found: Discovery, path: Path, size: int, spec: SplitSpec | None = None) -> SplitSpec:
    """The split the cache at `path` will hold, decided from the scan (every file's header read: a bad file is named
    now): the cache's saved folds.json; else that of a cache of the same cases at another size (named, its split
    taken over); else a new one, K adapted to the smaller class where --folds was not given. Returns the SplitSpec
    to ask."""
    cases = found.cases
    spec = spec or SplitSpec()
    saved = (path / FOLDS_FILE, load_folds(path / FOLDS_FILE)) if (path / FOLDS_FILE).is_file() else None
    for other in (
        []
        if saved or (path / MANIFEST).is_file()
        else other_caches(found.root, path.parent, size, target_params(found))
    ):
        log.info("%s holds these cases at another size; %s is prepared at %d^3 beside it", other, path, size)
        try:
            saved = (other / FOLDS_FILE, load_folds(other / FOLDS_FILE))
            check_asked(saved[1], spec, saved[0])
            log.info("its split %s is taken over, so that both caches hold the same folds", saved[0])
            break
        except DataError:  # none, or another split asked for
            saved = None
    plan = plan_split([c.id for c in cases], [c.label for c in cases], [c.site for c in cases], spec, saved,
                      patients=[c.patient for c in cases], classes=found.target.classes,
                      stratified_by=found.target.column)  # fmt: skip
    for note in plan.notes:
        log.warning("adapted to the cohort: %s", note)
    return plan.spec
