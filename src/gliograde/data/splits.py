"""Stratified patient-level K-fold splits, saved as folds.json beside the cache so every run of a fold sees
the same patients. One row of the cache is one patient, so a split by row is a split by patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from gliograde import GRADES
from gliograde.data.cache import VolumeCache
from gliograde.errors import DataError
from gliograde.files import write_json

FOLDS_FILE = "folds.json"


def make_folds(ids: list[str], labels, k: int = 5, seed: int = 42) -> dict:
    """{"k", "seed", "case_ids", "folds": [{"fold", "train", "val"}]} with each class spread evenly over folds."""
    labels = np.asarray(labels)
    if k < 2:
        raise DataError(f"--folds/k must be at least 2, got {k}")
    counts = {GRADES[c]: int((labels == c).sum()) for c in (0, 1)}
    small = {g: n for g, n in counts.items() if n < k}
    if small:
        raise DataError(
            f"cannot make {k} stratified folds: {', '.join(f'{g} has {n} case(s)' for g, n in small.items())}, "
            f"fewer than the {k} folds (each fold needs at least one case of each grade)"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (train, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds.append({"fold": i, "train": [ids[j] for j in train], "val": [ids[j] for j in val]})
    return {
        "k": k,
        "seed": seed,
        "stratified_by": "grade",
        "case_ids": list(ids),
        "class_counts": counts,
        "folds": folds,
    }


def folds_for_cache(cache: VolumeCache, k: int = 5, seed: int = 42) -> dict:
    """The folds of a cache: loaded from its folds.json, or made and saved there on first use.

    A folds.json made for other cases, or with another k or seed, is refused rather than silently replaced:
    changing the folds under finished runs would make their results incomparable.
    """
    path = cache.path / FOLDS_FILE
    if path.is_file():
        folds = load_folds(path)
        if sorted(folds["case_ids"]) != sorted(cache.ids):
            extra = sorted(set(folds["case_ids"]) - set(cache.ids))
            absent = sorted(set(cache.ids) - set(folds["case_ids"]))
            raise DataError(
                f"{path} does not match the cache's cases (in folds only: {extra[:5]}, in cache only: {absent[:5]}); "
                "remove it to make new folds"
            )
        if folds["k"] != k or folds["seed"] != seed:
            raise DataError(
                f"{path} holds {folds['k']} folds made with seed {folds['seed']}, but {k} folds with seed {seed} "
                "were asked for; pass the matching values or remove the file to make new folds"
            )
        return folds
    folds = make_folds(cache.ids, cache.labels, k, seed)
    write_json(path, folds, indent=1)
    return folds


def load_folds(path: str | Path) -> dict:
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
        _ = (
            [(f["fold"], f["train"], f["val"]) for f in folds["folds"]],
            folds["k"],
            folds["seed"],
            folds["case_ids"],
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable folds file ({type(e).__name__}: {e})") from e
    return folds


def fold_indices(cache: VolumeCache, folds: dict, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and validation patients of `fold` in the cache."""
    if not 0 <= fold < folds["k"]:
        raise DataError(f"--fold {fold} is outside 0..{folds['k'] - 1}")
    row = {cid: i for i, cid in enumerate(cache.ids)}
    split = folds["folds"][fold]
    return np.array([row[c] for c in split["train"]]), np.array([row[c] for c in split["val"]])
