"""The site-only baseline: a logistic regression on one-hot sites under the same folds as the networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from gliograde.errors import DataError
from gliograde.evaluation.site_baseline import NO_INNER, site_baseline, youden_threshold

HGG_SITES, LGG_SITES = ("CBICA", "TCIA01", "TCIA02"), ("TCIA10", "TCIA12", "TCIA13")


def _single_grade_cohort(n_per_site: int = 10):
    ids, labels = [], []
    for label, sites in ((1, HGG_SITES), (0, LGG_SITES)):
        for site in sites:
            for _ in range(n_per_site):
                ids.append(f"Brats18_{site}_{len(ids):04d}_1")
                labels.append(label)
    return ids, np.array(labels)


def _stratified_folds(ids, labels, k=5, seed=0, inner=True) -> dict:
    """Old-schema folds ({"folds": [...]}); with `inner`, each train part split into fit and select (stratified)."""
    folds = []
    outer = StratifiedKFold(k, shuffle=True, random_state=seed)
    for i, (tr, va) in enumerate(outer.split(np.zeros(len(labels)), labels)):
        entry = {"fold": i, "train": [ids[j] for j in tr], "val": [ids[j] for j in va]}
        if inner:
            fit_rows, select_rows = next(
                StratifiedKFold(3, shuffle=True, random_state=seed).split(np.zeros(len(tr)), labels[tr])
            )
            entry["fit"] = [ids[tr[j]] for j in fit_rows]
            entry["select"] = [ids[tr[j]] for j in select_rows]
        folds.append(entry)
    return {"k": k, "seed": seed, "case_ids": list(ids), "folds": folds}


def _new_schema(*repeats: dict) -> dict:
    return {"repeat_sets": [{"repeat": r, "folds": f["folds"]} for r, f in enumerate(repeats)]}


def test_single_grade_sites_and_shared_folds_give_auc_one():
    ids, labels = _single_grade_cohort()
    folds = _new_schema(_stratified_folds(ids, labels))
    for protocol in ("inner", "outer"):
        res = site_baseline(ids, labels, folds, protocol=protocol)
        assert res["protocol"] == protocol
        assert res["pooled"]["auc"] > 0.99 and res["pooled"]["n"] == len(ids)
        assert res["pooled"]["balanced_accuracy"] == 1.0
        assert all(f["auc"] > 0.99 for f in res["per_fold"]) and sum(f["n"] for f in res["per_fold"]) == len(ids)
        assert res["ids"] == ids and res["labels"] == labels.tolist() and len(res["probs"]) == len(ids)
    assert "youden" in site_baseline(ids, labels, folds)["pooled"]["threshold_policy"]


def test_site_grouped_folds_leave_the_baseline_at_chance_or_below():
    """No site in two folds: every validation site is unseen, so each fold predicts its training prior only."""
    ids, labels = _single_grade_cohort()
    site = [i.split("_")[1] for i in ids]
    folds = []
    for k, pair in enumerate(zip(HGG_SITES, LGG_SITES, strict=True)):
        val = [i for i, s in zip(ids, site, strict=True) if s in pair]
        train = [i for i in ids if i not in val]
        folds.append({"fold": k, "train": train, "val": val, "fit": train[::2], "select": train[1::2]})
    for protocol in ("inner", "outer"):
        res = site_baseline(ids, labels, {"folds": folds}, protocol=protocol)
        assert res["protocol"] == protocol
        assert all(f["auc"] == 0.5 for f in res["per_fold"])  # a constant within each fold
        assert res["pooled"]["auc"] <= 0.55


def test_uninformative_sites_give_auc_near_one_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    sites = rng.choice([*HGG_SITES, *LGG_SITES], 300)
    ids = [f"Brats18_{s}_{i:04d}_1" for i, s in enumerate(sites)]
    res = site_baseline(ids, labels, _stratified_folds(ids, labels), protocol="inner")
    assert abs(res["pooled"]["auc"] - 0.5) < 0.12


def test_synthetic_site_signal_is_found_by_the_baseline():
    from gliograde.data.synthetic import synthetic_plan

    plan = synthetic_plan(60, 210 / 285, 5, signal="site")
    ids, labels = [c for c, _, _ in plan], np.array([g == "HGG" for _, g, _ in plan], dtype=int)
    res = site_baseline(ids, labels, _stratified_folds(ids, labels, k=3), protocol="outer")
    assert res["pooled"]["auc"] > 0.99


def test_old_schema_without_inner_split_falls_back_to_outer_and_repeats_are_chosen():
    ids, labels = _single_grade_cohort(4)
    old = _stratified_folds(ids, labels, k=3, inner=False)
    res = site_baseline(ids, labels, old, protocol="inner")
    assert res["protocol"] == NO_INNER == "outer (no inner split in folds.json)"
    assert res["pooled"]["threshold_policy"] == "fixed 0.5"
    assert site_baseline(ids, labels, old, protocol="outer")["protocol"] == "outer"
    both = _new_schema(_stratified_folds(ids, labels, k=3, seed=0), _stratified_folds(ids, labels, k=4, seed=1))
    assert len(site_baseline(ids, labels, both, repeat=1)["per_fold"]) == 4
    with pytest.raises(DataError, match="repeat 2"):
        site_baseline(ids, labels, both, repeat=2)
    with pytest.raises(DataError, match="repeat 1"):
        site_baseline(ids, labels, old, repeat=1)
    with pytest.raises(DataError, match="protocol"):
        site_baseline(ids, labels, old, protocol="nested")
    with pytest.raises(DataError, match="not among the ids"):
        site_baseline(ids[:-1], labels[:-1], old)


def test_single_grade_training_part_predicts_its_prior():
    ids, labels = _single_grade_cohort(3)
    hgg = [i for i, y in zip(ids, labels, strict=True) if y == 1]
    lgg = [i for i, y in zip(ids, labels, strict=True) if y == 0]
    folds = {
        "folds": [
            {
                "fold": 0,
                "train": hgg[:6] + lgg[:6],
                "fit": hgg[:4],
                "select": hgg[4:6] + lgg[:6],
                "val": hgg[6:] + lgg[6:],
            },
            {
                "fold": 1,
                "train": hgg[6:] + lgg[6:],
                "fit": hgg[6:] + lgg[6:],
                "select": hgg[6:],
                "val": hgg[:6] + lgg[:6],
            },
        ]
    }
    res = site_baseline(ids, labels, folds, protocol="inner")
    probs = dict(zip(res["ids"], res["probs"], strict=True))
    assert {probs[c] for c in hgg[6:] + lgg[6:]} == {1.0}  # fit held HGG only: P(HGG) = 1 for everyone
    assert res["per_fold"][0]["auc"] == 0.5
    assert res["per_fold"][1]["threshold"] == 0.5  # select held one grade: no Youden threshold, the default
    assert res["per_fold"][1]["auc"] == 0.5  # every validation site unseen in fit


def test_youden_threshold():
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) in (0.35, 0.8)
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 0.7
    assert youden_threshold([1, 1], [0.3, 0.6]) == 0.5
    assert youden_threshold([], []) == 0.5
    assert math.isnan(
        site_baseline(
            ["Brats18_A_1_1", "Brats18_B_2_1"],
            [1, 1],
            {"folds": [{"fold": 0, "train": ["Brats18_A_1_1"], "val": ["Brats18_B_2_1"]}]},
            protocol="outer",
        )["pooled"]["auc"]
    )
