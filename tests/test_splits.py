"""Patient-level folds: outer folds, the inner fit/select split, persistence, upgrades and refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from gliograde import MODALITIES
from gliograde.data.cache import CaseRecord, VolumeCache, open_cache, prepare_cache
from gliograde.data.splits import (
    FoldSplit,
    SplitSpec,
    describe,
    fold_split,
    folds_for_cache,
    largest_k,
    load_folds,
    make_folds,
    needed_per_grade,
    outer_splits,
    plan_split,
)
from gliograde.errors import DataError


def _at(cache: VolumeCache, folder) -> VolumeCache:
    """The same cases, with folds.json kept in `folder` (session caches stay untouched)."""
    return VolumeCache(folder, cache.volumes, cache.cases, cache.modalities, cache.manifest)


def _fake(folder, ids, labels, sites=None) -> VolumeCache:
    sites = sites or [i.split("_")[1] for i in ids]
    cases = [CaseRecord(i, ("LGG", "HGG")[y], int(y), s) for i, y, s in zip(ids, labels, sites, strict=True)]
    return VolumeCache(folder, np.zeros((len(ids), 4, 1, 1, 1), np.float16), cases, MODALITIES, {})


def _multisite(n=60, n_sites=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"Brats18_S{i % n_sites}_{i:03d}_1" for i in range(n)]
    labels = (rng.random(n) < 0.6).astype(int)
    labels[:n_sites] = 0  # every site holds both grades
    labels[n_sites : 2 * n_sites] = 1
    return ids, labels


def _check_protocol(folds: dict, ids: list[str]) -> None:
    """Every repeat: validation parts partition the patients; fit + select = train, disjoint, never validated."""
    assert folds["version"] == 2 and len(folds["repeat_sets"]) == folds["repeats"]
    assert folds["folds"] == folds["repeat_sets"][0]["folds"]
    for rs in folds["repeat_sets"]:
        vals = [c for f in rs["folds"] for c in f["val"]]
        assert sorted(vals) == sorted(ids)  # every patient validated exactly once per repeat
        for f in rs["folds"]:
            train, val, fit, select = (set(f[key]) for key in ("train", "val", "fit", "select"))
            assert not train & val and train | val == set(ids)
            assert fit | select == train and not fit & select
            assert not select & val and not fit & val
            assert len(f["fit"]) + len(f["select"]) == len(f["train"])


def _grades(cache_or_ids, labels=None):
    if labels is None:
        return {c.id: c.grade for c in cache_or_ids.cases}
    return {i: ("LGG", "HGG")[y] for i, y in zip(cache_or_ids, labels, strict=True)}


# ----------------------------------------------------------------------------------- outer folds (v1 tests)
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
    _check_protocol(folds, ids)


def test_too_few_cases_of_a_class_is_an_error():
    with pytest.raises(DataError, match="LGG has 3 case"):
        make_folds([f"c{i}" for i in range(10)], [1] * 7 + [0] * 3, k=5)


# ------------------------------------------------------------------------------- K planned before preprocessing
def test_largest_k_follows_the_smaller_grade():
    assert largest_k({"HGG": 5, "LGG": 4}, 5) == 4
    assert largest_k({"HGG": 210, "LGG": 75}, 5) == 5
    assert largest_k({"HGG": 9, "LGG": 3}, 5) == 3  # and not 2: two folds need 4 of each grade
    assert largest_k({"HGG": 9, "LGG": 2}, 5) is None
    assert [needed_per_grade(k) for k in (2, 3, 4, 5)] == [4, 3, 4, 5]


def _sample_like():
    """The nine real cases' ids and grades (5 HGG, 4 LGG), without reading a volume."""
    ids = ["Brats18_2013_3_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA01_425_1", "Brats18_TCIA02_370_1",
           "Brats18_TCIA03_265_1", "Brats18_TCIA10_628_1", "Brats18_TCIA10_637_1", "Brats18_TCIA10_639_1",
           "Brats18_TCIA13_623_1"]  # fmt: skip
    return ids, [1] * 5 + [0] * 4, [i.split("_")[1] for i in ids]


def test_a_default_k_the_cohort_cannot_hold_is_adapted_and_said():
    ids, labels, sites = _sample_like()
    plan = plan_split(ids, labels, sites, SplitSpec())
    assert (
        plan.spec.k == 4
        and plan.folds["k"] == 4
        and plan.notes == ["4 LGG: 4 folds (the default 5 needs at least 5 patients of each grade)"]
    )
    assert plan.folds == make_folds(ids, labels, 4, 42, sites=sites)  # what folds_for_cache will then make
    assert plan.source.startswith("adapted: 4 LGG: 4 folds")


def test_an_explicit_k_the_cohort_cannot_hold_is_refused_saying_what_to_pass():
    ids, labels, sites = _sample_like()
    with pytest.raises(DataError, match=r"^--folds 5: LGG has 4 case\(s\), but 5 stratified folds .* pass --folds 4$"):
        plan_split(ids, labels, sites, SplitSpec(k=5))
    with pytest.raises(DataError, match=r"LGG has 2 case\(s\): cross-validation .* at least 3 patients of each grade"):
        plan_split(ids[:7], labels[:7], sites[:7], SplitSpec())
    assert plan_split(ids, labels, sites, SplitSpec(k=3)).notes == []  # what fits is left alone
    with pytest.raises(DataError, match=r"--folds 2: LGG has 3 case\(s\).* pass --folds 3$"):  # 2 folds need 4
        plan_split(ids[:8], labels[:8], sites[:8], SplitSpec(k=2))


def test_a_saved_split_is_the_plan(tmp_path):
    ids, labels, sites = _sample_like()
    saved = make_folds(ids, labels, 3, 7, sites=sites)
    plan = plan_split(ids, labels, sites, SplitSpec(), (tmp_path / "folds.json", saved))
    assert plan.folds is saved and plan.spec.k == 3 and plan.spec.seed == 7 and plan.notes == []
    with pytest.raises(DataError, match="holds a split with k=3, but k=4 was asked"):
        plan_split(ids, labels, sites, SplitSpec(k=4), (tmp_path / "folds.json", saved))
    other = make_folds(ids[1:], labels[1:], 3, 7, sites=sites[1:])  # of other cases: a new split is planned
    assert plan_split(ids, labels, sites, SplitSpec(), (tmp_path / "folds.json", other)).spec.k == 4


@pytest.fixture
def small_cache(synth_root, tmp_path):
    return open_cache(prepare_cache(synth_root, tmp_path / "cache", size=16, workers=1, progress=False).path)


def test_folds_saved_beside_the_cache_and_reloaded(small_cache):
    first = folds_for_cache(small_cache, 5, 42)
    path = small_cache.path / "folds.json"
    assert json.loads(path.read_text()) == first
    assert folds_for_cache(small_cache, 5, 42) == first
    split = fold_split(small_cache, first, 2)
    assert sorted(np.concatenate([split.train, split.val])) == list(range(len(small_cache.cases)))
    with pytest.raises(DataError, match=r"--fold 5 is outside 0..4"):
        fold_split(small_cache, first, 5)


def test_folds_of_other_cases_or_settings_are_refused(small_cache):
    folds = folds_for_cache(small_cache, 5, 42)
    with pytest.raises(DataError, match="holds a split with k=5, but k=4 was asked for"):
        folds_for_cache(small_cache, 4, 42)
    folds["case_ids"][0] = "Brats18_NOPE_1_1"
    (small_cache.path / "folds.json").write_text(json.dumps(folds))
    with pytest.raises(DataError, match="does not match the cache's cases"):
        folds_for_cache(small_cache, 5, 42)


# --------------------------------------------------------------------------------- the real nine patients
def test_real_cases_two_folds_with_inner_split(real_cache, tmp_path):
    cache = _at(real_cache, tmp_path)
    folds = folds_for_cache(cache, SplitSpec(k=2))
    _check_protocol(folds, cache.ids)
    grades = _grades(cache)
    for fold in range(2):
        entry = folds["folds"][fold]
        for part in ("fit", "select", "val"):  # each part holds both grades (4 LGG: 2 per fold, 1 + 1 inside)
            assert {grades[c] for c in entry[part]} == {"HGG", "LGG"}, (fold, part)
        split = fold_split(cache, folds, fold)
        ids = np.array(cache.ids)
        assert set(ids[split.select]).isdisjoint(ids[split.val])  # selection never sees outer validation
        assert set(ids[split.fit]) | set(ids[split.select]) == set(ids[split.train])
        assert sorted(ids[split.train].tolist()) == sorted(entry["train"])
    assert (
        describe(folds) == "2 folds x 1 repeat stratified by grade; inner selection 20% of each training part; seed 42"
    )


def test_real_cases_grouped_by_site(real_cache, tmp_path):
    labels, sites = real_cache.labels, np.array([c.site for c in real_cache.cases])
    assert sorted({s for s, y in zip(sites, labels, strict=True) if y == 0}) == ["TCIA10", "TCIA13"]
    splits = outer_splits(labels, sites, k=2, seed=42, group_by="site")
    val_sites = [set(sites[v]) for _, v in splits]
    assert not val_sites[0] & val_sites[1]  # no site in two folds
    for train, val in splits:
        assert not set(sites[train]) & set(sites[val])
        assert set(labels[val]) == {0, 1}
    with pytest.raises(DataError, match="largest K possible: 2") as err:
        folds_for_cache(_at(real_cache, tmp_path), SplitSpec(k=3, group_by="site"))
    assert "TCIA10 (0 HGG, 3 LGG)" in str(err.value) and "TCIA13 (0 HGG, 1 LGG)" in str(err.value)
    assert not (tmp_path / "folds.json").exists()
    # k=2 works for the outer folds, but the fold that validates TCIA10 trains on one LGG patient (TCIA13's):
    # too few for a selection part and a fit part that both hold both grades
    with pytest.raises(DataError, match=r"training part holds 1 LGG patient\(s\).*grouping by site"):
        folds_for_cache(_at(real_cache, tmp_path), SplitSpec(k=2, group_by="site"))


def test_grouping_impossible_names_it():
    ids = [f"Brats18_A_{i}_1" for i in range(6)] + [f"Brats18_B_{i}_1" for i in range(6)]
    labels = [1, 1, 1, 0, 0, 0] + [1] * 6
    with pytest.raises(DataError, match=r"largest K possible: 1, so grouping by site is impossible here"):
        make_folds(ids, labels, 2, group_by="site")


# ------------------------------------------------------------------------------------ repeats, persistence
def test_repeats_persist_and_refuse_explicit_changes(tmp_path):
    ids, labels = _multisite(40)
    cache = _fake(tmp_path, ids, labels)
    folds = folds_for_cache(cache, SplitSpec(k=4, repeats=2, seed=7))
    _check_protocol(folds, ids)
    r0, r1 = folds["repeat_sets"]
    assert (r0["seed"], r1["seed"]) == (7, 8)
    assert [sorted(f["val"]) for f in r0["folds"]] != [sorted(f["val"]) for f in r1["folds"]]
    assert load_folds(tmp_path / "folds.json") == folds
    assert folds_for_cache(cache, SplitSpec(k=4, repeats=2, seed=7)) == folds
    assert folds_for_cache(cache) == folds  # nothing asked: the saved split is the truth
    assert folds_for_cache(cache, SplitSpec(repeats=2)) == folds
    for spec, text in [
        (SplitSpec(seed=8), "holds a split with seed=7, but seed=8 was asked for"),
        (SplitSpec(k=5), "holds a split with k=4, but k=5 was asked for"),
        (SplitSpec(repeats=3), "holds a split with repeats=2, but repeats=3 was asked for"),
        (SplitSpec(k=3, seed=1), "holds a split with k=4, seed=7, but k=3, seed=1 were asked for"),
        (SplitSpec(group_by="site"), "group_by=None, but group_by='site' was asked for"),
        (SplitSpec(inner_fraction=0.3), "inner_fraction=0.2, but inner_fraction=0.3 was asked for"),
    ]:
        with pytest.raises(DataError, match=text.replace("(", r"\(")):
            folds_for_cache(cache, spec)
    assert json.loads((tmp_path / "folds.json").read_text()) == folds  # refusals leave the file alone
    r1_split = fold_split(cache, folds, 3, repeat=1)
    assert sorted(np.array(ids)[r1_split.val]) == sorted(r1["folds"][3]["val"])
    with pytest.raises(DataError, match=r"--repeat 2 is outside 0..1"):
        fold_split(cache, folds, 0, repeat=2)
    assert describe(folds).startswith("4 folds x 2 repeats stratified by grade;")


def test_prepare_with_three_folds_then_train_without_asking(small_cache):
    made = folds_for_cache(small_cache, SplitSpec(k=3))
    assert folds_for_cache(small_cache, SplitSpec()) == made and made["k"] == 3
    assert folds_for_cache(small_cache, None, None, None)["k"] == 3


def test_folds_are_deterministic_per_seed_and_inner_split_too():
    ids, labels = _multisite(50)
    a = make_folds(ids, labels, 5, 3, repeats=2, inner_fraction=0.25)
    assert a == make_folds(ids, labels, 5, 3, repeats=2, inner_fraction=0.25)
    grades = _grades(ids, labels)
    for f in a["folds"]:
        train = [grades[c] for c in f["train"]]
        select = [grades[c] for c in f["select"]]
        for g in ("LGG", "HGG"):  # 25% of each grade, rounded, at least 1
            assert select.count(g) == max(1, int(np.floor(0.25 * train.count(g) + 0.5)))


# ------------------------------------------------------------------------------------------- upgrade of v1
def test_version_1_file_is_upgraded_in_place(tmp_path, caplog):
    ids, labels = _multisite(30)
    cache = _fake(tmp_path, ids, labels)
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=5)
    v1 = {
        "k": 3,
        "seed": 5,
        "stratified_by": "grade",
        "case_ids": ids,
        "class_counts": {"LGG": int((labels == 0).sum()), "HGG": int((labels == 1).sum())},
        "folds": [
            {"fold": i, "train": [ids[j] for j in t], "val": [ids[j] for j in v]}
            for i, (t, v) in enumerate(splitter.split(np.zeros(len(ids)), labels))
        ],
    }
    (tmp_path / "folds.json").write_text(json.dumps(v1, indent=1))
    assert describe(load_folds(tmp_path / "folds.json")).endswith("(version 1: no inner selection split)")
    with pytest.raises(DataError, match="k=3, but k=5 was asked for"):
        folds_for_cache(cache, SplitSpec(k=5))
    with pytest.raises(DataError, match="repeats=1, but repeats=2 was asked for"):
        folds_for_cache(cache, SplitSpec(repeats=2))
    with caplog.at_level(logging.INFO, logger="gliograde"):
        folds = folds_for_cache(cache)
    assert "upgraded" in caplog.text and "version 2" in caplog.text
    on_disk = json.loads((tmp_path / "folds.json").read_text())
    assert on_disk == folds and on_disk["version"] == 2 and on_disk["repeats"] == 1
    for old, new in zip(v1["folds"], on_disk["repeat_sets"][0]["folds"], strict=True):
        assert (new["train"], new["val"]) == (old["train"], old["val"])  # identical, order included
        assert (new["train"], new["val"]) == (on_disk["folds"][old["fold"]]["train"], old["val"])
    _check_protocol(folds, ids)
    assert folds_for_cache(cache, 3, 5) == folds  # the old positional call, now matching
    # same folds as the new code makes from scratch with that k and seed
    assert make_folds(ids, labels, 3, 5, sites=[c.site for c in cache.cases]) == folds


def test_version_1_fold_split_asks_for_upgrade(tmp_path):
    ids, labels = _multisite(20)
    v1 = make_folds(ids, labels, 2, 1)
    v1 = {key: v1[key] for key in ("k", "seed", "case_ids", "folds")}
    cache = _fake(tmp_path, ids, labels)
    v1["folds"] = [{key: f[key] for key in ("fold", "train", "val")} for f in v1["folds"]]
    with pytest.raises(DataError, match="no inner fit/select split"):
        fold_split(cache, v1, 0)


# --------------------------------------------------------------------------------------- grouping by site
def test_grouped_folds_keep_sites_apart_inside_too():
    ids, labels = _multisite(120, n_sites=10, seed=1)
    sites = np.array([i.split("_")[1] for i in ids])
    site = dict(zip(ids, sites, strict=True))
    folds = make_folds(ids, labels, 3, 42, group_by="site", repeats=2)
    _check_protocol(folds, ids)
    assert folds["group_by"] == "site" and folds["sites"]["S0"]["LGG"] >= 1
    for rs in folds["repeat_sets"]:
        val_sites = [{site[c] for c in f["val"]} for f in rs["folds"]]
        assert sum(map(len, val_sites)) == len(set().union(*val_sites)) == 10  # no site in two folds
        for f in rs["folds"]:
            assert f["inner_grouped"]  # 10 sites with both grades: whole sites are always possible
            assert not {site[c] for c in f["fit"]} & {site[c] for c in f["select"]}
            assert len(f["select"]) <= len(f["train"]) / 2
    assert "grouped by site" in describe(folds) and "whole sites in 6/6 folds" in describe(folds)


def test_grouped_inner_split_falls_back_when_sites_cannot_be_kept_apart():
    # the training part of every fold has a single LGG-holding site besides the held-out ones
    ids = [f"Brats18_L{i // 3}_{i}_1" for i in range(6)] + [f"Brats18_H{i % 4}_{i}_1" for i in range(6, 18)]
    labels = [0] * 6 + [1] * 12
    folds = make_folds(ids, labels, 2, 0, group_by="site")
    _check_protocol(folds, ids)
    assert [f["inner_grouped"] for f in folds["folds"]] == [False, False]


def test_leave_site_out_on_synthetic_cases(tiny_cache):
    ids, labels = tiny_cache.ids, tiny_cache.labels
    sites = [c.site for c in tiny_cache.cases]
    names = sorted(set(sites))
    if len(names) < 2:
        pytest.skip(f"the synthetic set has one site only ({names})")
    folds = make_folds(ids, labels, None, 42, leave_site_out=True, sites=sites)
    _check_protocol(folds, ids)
    assert folds["k"] == len(names) and folds["leave_site_out"] and folds["group_by"] == "site"
    assert [f["site"] for f in folds["folds"]] == names
    for f in folds["folds"]:
        assert sorted(f["val"]) == sorted(i for i, s in zip(ids, sites, strict=True) if s == f["site"])
    assert make_folds(ids, labels, len(names), 42, leave_site_out=True, sites=sites) == folds
    assert describe(folds).startswith(f"leave-site-out: {len(names)} folds, one per site")
    with pytest.raises(DataError, match=f"one fold per site, {len(names)} here .* but k={len(names) + 1}"):
        make_folds(ids, labels, len(names) + 1, 42, leave_site_out=True, sites=sites)
    with pytest.raises(DataError, match="repeats must be 1, got 2"):
        make_folds(ids, labels, None, 42, leave_site_out=True, repeats=2, sites=sites)


def test_leave_site_out_through_the_cache(tmp_path):
    ids, labels = _multisite(36, n_sites=4)
    cache = _fake(tmp_path, ids, labels)
    folds = folds_for_cache(cache, SplitSpec(leave_site_out=True))
    assert folds["k"] == 4 and folds_for_cache(cache, SplitSpec(leave_site_out=True, group_by="site")) == folds
    assert folds_for_cache(cache) == folds
    with pytest.raises(DataError, match="leave_site_out=True, but leave_site_out=False was asked for"):
        folds_for_cache(cache, SplitSpec(leave_site_out=False))


# ------------------------------------------------------------------------------------------------ refusals
def test_too_few_patients_for_the_inner_split_names_grade_and_number():
    assert [needed_per_grade(k) for k in (2, 3, 5, 10)] == [4, 3, 5, 10]
    ids = [f"c{i}" for i in range(12)]
    with pytest.raises(DataError, match=r"LGG has 3 case\(s\) where at least 4 are needed") as err:
        make_folds(ids, [1] * 9 + [0] * 3, k=2)
    assert "HGG" not in str(err.value).split("(")[0]
    with pytest.raises(DataError, match=r"LGG has 2 case\(s\) where at least 4 are needed, HGG has 3"):
        make_folds(ids[:5], [1] * 3 + [0] * 2, k=2)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"k": 1}, "must be an integer of at least 2, got 1"),
        ({"repeats": 0}, "repeats must be an integer of at least 1, got 0"),
        ({"inner_fraction": 0.0}, r"inner_fraction must lie in \(0, 0.5\]"),
        ({"inner_fraction": 0.6}, r"inner_fraction must lie in \(0, 0.5\].*got 0.6"),
        ({"group_by": "scanner"}, "group_by must be 'site' or None, got 'scanner'"),
        ({"seed": -1}, "the split seed must be an integer"),
    ],
)
def test_bad_settings_are_refused(kwargs, text, tmp_path):
    ids, labels = _multisite(30)
    args = {"k": 3, "seed": 42, **kwargs}
    k, seed = args.pop("k"), args.pop("seed")
    with pytest.raises(DataError, match=text):
        make_folds(ids, labels, k, seed, **args)
    with pytest.raises(DataError, match=text):
        folds_for_cache(_fake(tmp_path, ids, labels), SplitSpec(**kwargs))
    assert not (tmp_path / "folds.json").exists()


def test_inconsistent_fold_is_refused(tmp_path):
    ids, labels = _multisite(20)
    cache = _fake(tmp_path, ids, labels)
    folds = folds_for_cache(cache, SplitSpec(k=2))
    folds["folds"][0]["select"].append(folds["folds"][0]["val"][0])
    with pytest.raises(DataError, match=r"both train and validate|fit and select do not make up"):
        fold_split(cache, folds, 0)
    with pytest.raises(DataError, match="in both fit and select"):
        FoldSplit(np.array([0, 1, 2]), np.array([3]), np.array([0, 1]), np.array([1, 2]))


def test_spec_resolution():
    assert SplitSpec().resolved() == SplitSpec(5, 42, 1, None, False, 0.2)
    assert SplitSpec(leave_site_out=True).resolved(n_sites=7) == SplitSpec(7, 42, 1, "site", True, 0.2)
    assert SplitSpec(k=3, seed=1).asked() == {"k": 3, "seed": 1}


@pytest.mark.slow
def test_the_persisted_split_is_the_truth_for_train_and_cv(synth_root, tmp_path, capsys):
    """prepare --folds 3, then train without --folds: K (and the seed, repeats, inner part) come from folds.json;
    only an explicit, different --folds is refused."""
    import json

    from gliograde.cli import main

    cache = tmp_path / "cache"
    assert main(["prepare", "--data-root", str(synth_root), "--out", str(cache), "--size", "16", "--folds", "3",
                 "--workers", "1"]) == 0  # fmt: skip
    common = ["--preset", "cpu-demo", "--size", "16", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "r")]
    assert main(["train", *common, "--fold", "2", "--epochs", "1", "--min-epochs", "1"]) == 0
    run = next((tmp_path / "r" / "runs" / "fold_2").iterdir())
    config = json.loads((run / "config" / "config.json").read_text())["config"]
    assert (config["folds"], config["split_seed"], config["repeats"], config["inner_fraction"]) == (3, 42, 1, 0.2)
    capsys.readouterr()
    assert main(["train", *common, "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds a split with k=3" in err and "k=5" in err
    with pytest.raises(SystemExit) as e:  # --folds is K in every command (argparse's usage error)
        main(["cv", *common, "--folds", "0,2"])
    assert e.value.code == 2 and "pick folds with --only 0,2" in capsys.readouterr().err
