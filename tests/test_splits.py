"""Stratified patient-level folds: properties, persistence and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gliograde.data.cache import open_cache, prepare_cache
from gliograde.data.splits import fold_indices, folds_for_cache, make_folds
from gliograde.errors import DataError


def test_folds_are_stratified_disjoint_and_cover_everyone():
    ids = [f"c{i}" for i in range(57)]
    labels = np.array([1] * 42 + [0] * 15)
    folds = make_folds(ids, labels, k=5, seed=42)
    vals = [set(f["val"]) for f in folds["folds"]]
    assert set().union(*vals) == set(ids) and sum(map(len, vals)) == len(ids)
    for f in folds["folds"]:
        assert not set(f["train"]) & set(f["val"])
        assert set(f["train"]) | set(f["val"]) == set(ids)
        n_lgg = sum(labels[ids.index(c)] == 0 for c in f["val"])
        assert n_lgg == 3  # 15 LGG over 5 folds
    assert make_folds(ids, labels, 5, 42) == folds
    assert make_folds(ids, labels, 5, 43) != folds


def test_too_few_cases_of_a_class_is_an_error():
    with pytest.raises(DataError, match="LGG has 3 case"):
        make_folds([f"c{i}" for i in range(10)], [1] * 7 + [0] * 3, k=5)


@pytest.fixture
def small_cache(synth_root, tmp_path):
    return open_cache(prepare_cache(synth_root, tmp_path / "cache", size=16, workers=1, progress=False).path)


def test_folds_saved_beside_the_cache_and_reloaded(small_cache):
    first = folds_for_cache(small_cache, 5, 42)
    path = small_cache.path / "folds.json"
    assert json.loads(path.read_text()) == first
    assert folds_for_cache(small_cache, 5, 42) == first
    train, val = fold_indices(small_cache, first, 2)
    assert sorted(np.concatenate([train, val])) == list(range(len(small_cache.cases)))
    with pytest.raises(DataError, match=r"--fold 5 is outside 0..4"):
        fold_indices(small_cache, first, 5)


def test_folds_of_other_cases_or_settings_are_refused(small_cache):
    folds = folds_for_cache(small_cache, 5, 42)
    with pytest.raises(DataError, match="5 folds made with seed 42"):
        folds_for_cache(small_cache, 4, 42)
    folds["case_ids"][0] = "Brats18_NOPE_1_1"
    (small_cache.path / "folds.json").write_text(json.dumps(folds))
    with pytest.raises(DataError, match="does not match the cache's cases"):
        folds_for_cache(small_cache, 5, 42)
