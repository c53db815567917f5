"""Where a run's volumes and folds come from: the cache named by --cache-dir, or one prepared from the data root.
Shared by training, `evaluate` and `cv`, so that all of them read the same persisted split."""

from __future__ import annotations

import logging
from pathlib import Path

from gliograde.config import TrainConfig, split_spec
from gliograde.data.brats import resolve_data_root
from gliograde.data.cache import VolumeCache, default_cache_path, open_cache, prepare_cache
from gliograde.data.splits import FOLDS_FILE, check_asked, folds_for_cache, load_folds
from gliograde.errors import GliogradeError

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


def saved_split(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """The folds.json that `load_data` would use, where it is already on disk: (its path, the folds), checked
    against the split settings cfg asks for; None where there is none yet (`load_data` would make it). Reads
    only: nothing is prepared, made or upgraded (for --dry-run)."""
    direct = Path(cfg.cache_dir)
    if (direct / "manifest.json").is_file():
        cache_path = direct
    else:
        try:
            root = resolve_data_root(cfg.data_root)
        except GliogradeError:
            return None
        cache_path = default_cache_path(root, cfg.size, cfg.cache_dir)
    path = cache_path / FOLDS_FILE
    if not path.is_file():
        return None
    folds = load_folds(path)
    check_asked(folds, split_spec(cfg), path)
    return path, folds
