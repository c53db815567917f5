"""Numbers that hold with three LGG patients in a fold (issue 20, section 1): intervals that do not collapse, a grade
that is absent reads undefined (not 0), one operating point in every table, the per-fold mean as the headline
beside the pooled AUC, unknown sites counted apart, every method named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gliograde.evaluation import stats
from gliograde.evaluation.metrics import compute_metrics
from gliograde.evaluation.site_baseline import site_baseline
from gliograde.evaluation.summary import site_audit, site_warning, summarize


def fake_run(results, fold, k, ids, labels, probs, cache, threshold):
    """A complete run folder with given validation predictions and the fold's decision threshold."""
    run = results / "runs" / f"fold_{fold}" / "run_20260101_000000"
    for sub in ("metrics", "config", "predictions", "checkpoints"):
        (run / sub).mkdir(parents=True)
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    final = {**compute_metrics(labels, probs, threshold), "threshold": threshold, "best_epoch": 2, "checkpoint": "b"}
    (run / "metrics" / "metrics.json").write_text(
        json.dumps({"status": "complete", "fold": fold, "final": final, "history": []})
    )
    (run / "config" / "config.json").write_text(json.dumps({"config": {"fold": fold, "folds": k, "cache_dir": cache}}))
    np.save(run / "predictions" / "val_labels.npy", labels)
    np.save(run / "predictions" / "val_probs.npy", probs)
    (run / "predictions" / "val_ids.json").write_text(json.dumps(ids))


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """Three folds; fold 2 holds no LGG patient. Thresholds 0.3, 0.6, 0.45 (not 0.5). The 2013 cohort is mixed, and
    two patients have ids that name no site."""
    results = tmp_path_factory.mktemp("results")
    cache = results / "cache"
    cache.mkdir()
    folds = [
        # (ids, labels, probs, threshold)
        (["Brats18_2013_0_1", "Brats18_2013_1_1", "Brats18_TCIA10_2_1", "Brats18_CBICA_3_1", "Brats18_CBICA_4_1",
          "patient_a"],
         [0, 1, 0, 1, 1, 0], [0.40, 0.35, 0.10, 0.90, 0.80, 0.20], 0.3),
        (["Brats18_2013_5_1", "Brats18_2013_6_1", "Brats18_TCIA10_7_1", "Brats18_CBICA_8_1", "Brats18_CBICA_9_1",
          "patient_b"],
         [1, 0, 0, 1, 1, 1], [0.55, 0.58, 0.20, 0.95, 0.70, 0.65], 0.6),
        (["Brats18_2013_10_1", "Brats18_CBICA_11_1", "Brats18_CBICA_12_1", "Brats18_TCIA01_13_1"],
         [1, 1, 1, 1], [0.50, 0.90, 0.40, 0.70], 0.45),
    ]  # fmt: skip
    entries, all_ids = [], []
    for f, (ids, labels, probs, thr) in enumerate(folds):
        fake_run(results, f, 3, ids, labels, probs, str(cache), thr)
        entries.append({"fold": f, "val": ids})
        all_ids += ids
    for e in entries:
        e["train"] = [i for i in all_ids if i not in set(e["val"])]
    (cache / "folds.json").write_text(json.dumps({"k": 3, "seed": 0, "case_ids": all_ids, "folds": entries}))
    return results, summarize(results, bootstrap=100), folds


# ----------------------------------------------------------------------------------- intervals that do not collapse
def _newcombe_lower_by_polynomial(auc: float, m: int, n: int, z: float) -> float:
    """Newcombe (2006), Stat Med 25:559-573, method 5, solved independently: with N* = (m + n)/2 - 1, the limits are
    roots of the quartic mn (auc - t)^2 (2 - t)(1 + t) = z^2 t (1 - t) [(2 - t)(1 + t) + N* (1 - t)(1 + t)
    + N* t (2 - t)], found here with numpy's companion-matrix root finder (the code uses Brent's method)."""
    from numpy.polynomial import Polynomial as P

    t, star = P([0, 1]), (m + n) / 2 - 1
    d = (2 - t) * (1 + t)
    quartic = m * n * (auc - t) ** 2 * d - z**2 * t * (1 - t) * (d + star * (1 - t) * (1 + t) + star * t * (2 - t))
    roots = [r.real for r in quartic.roots() if abs(r.imag) < 1e-9 and 0 < r.real < auc - 1e-9]
    return min(roots, key=lambda r: abs(r - auc))  # the root next below auc (t = auc = 1 is a root too)


def test_three_lgg_perfectly_separated_keep_a_wide_interval():
    y = np.r_[np.ones(9, dtype=int), np.zeros(3, dtype=int)]  # 9 HGG, 3 LGG
    s = np.r_[np.linspace(0.6, 0.9, 9), [0.1, 0.2, 0.3]]  # every HGG above every LGG: AUC = 1
    d = stats.delong_auc(y, s)
    assert d["se"] == 0 and d["ci_high"] - d["ci_low"] < 1e-12 and d["degenerate"]  # DeLong collapses
    r = stats.auc_interval(y, s)
    # 0.6210: Newcombe (2006) method 5 for m = 9, n = 3, AUC = 1 (the root of the quartic above)
    assert r["auc"] == 1.0 and r["ci_high"] == 1.0 and round(r["ci_low"], 4) == 0.6210
    assert r["ci_low"] == pytest.approx(_newcombe_lower_by_polynomial(1.0, 9, 3, stats.Z95), abs=1e-9)
    assert r["method"].startswith("Newcombe (2006)")


@pytest.mark.parametrize(("auc", "m", "n"), [(0.8, 50, 50), (0.6, 9, 3), (0.95, 20, 5), (1.0, 40, 40)])
def test_newcombe_limits_are_the_roots_of_his_equation(auc, m, n):
    lo, hi = stats.newcombe_auc_ci(auc, m, n)
    assert lo == pytest.approx(_newcombe_lower_by_polynomial(auc, m, n, stats.Z95), abs=1e-9)
    if auc < 1:
        assert 1 - hi == pytest.approx(_newcombe_lower_by_polynomial(1 - auc, m, n, stats.Z95), abs=1e-9)
    assert lo < auc <= hi


def test_all_scores_tied_and_auc_zero_keep_a_width():
    y = np.r_[np.ones(9, dtype=int), np.zeros(3, dtype=int)]
    tied = stats.auc_interval(y, np.full(12, 0.7))
    assert tied["auc"] == 0.5 and tied["ci_low"] < 0.3 and tied["ci_high"] > 0.7
    assert stats.newcombe_auc_ci(0.0, 9, 3) == pytest.approx((0.0, 1 - 0.6209951820892784))
    # one patient of each grade: N* = 0, V = t(1 - t), the lower limit solves 1 - t = z^2 t (Wilson's, n = 1)
    assert stats.newcombe_auc_ci(1.0, 1, 1)[0] == pytest.approx(1 / (1 + stats.Z95**2))


# ----------------------------------------------------------------------------------- an absent grade is undefined
def test_a_cohort_without_lgg_has_no_specificity_and_no_balanced_accuracy():
    m = compute_metrics([1, 1, 1], [0.9, 0.8, 0.2])
    assert math.isnan(m["specificity"]) and math.isnan(m["balanced_accuracy"]) and math.isnan(m["f1"])
    assert math.isnan(m["auc"]) and m["sensitivity"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    both = compute_metrics([1, 1, 1, 0], [0.9, 0.8, 0.2, 0.1])
    assert both["specificity"] == 1.0 and both["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_the_fold_without_lgg_reads_na_and_stays_out_of_the_means(cv):
    results, report, folds = cv
    row = report["folds"][2]
    assert math.isnan(row["specificity"]) and math.isnan(row["balanced_accuracy"]) and math.isnan(row["auc"])
    assert row["auc_ci95"] is None and row["n_lgg"] == 0
    spec = [compute_metrics(lb, p, t)["specificity"] for _, lb, p, t in folds[:2]]
    assert report["mean"]["specificity"] == pytest.approx(np.mean(spec)) and report["n_folds"]["specificity"] == 2
    assert report["n_folds"]["sensitivity"] == 3 and report["n_folds"]["auc"] == 2
    assert "(n = 2 of 3)" in (results / "summary.md").read_text()
    text = (results / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # JSON null, not NaN tokens
    assert json.loads(text)["folds"][2]["specificity"] is None
    assert "n = 2 of 3" in (results / "report.html").read_text()


# ----------------------------------------------------------------------------------- one operating point everywhere
def test_the_2013_cohort_and_the_site_table_use_each_folds_threshold(cv):
    _, report, _ = cv
    cohort = report["sites"]["mixed_cohort"]
    assert cohort["accuracy"] == pytest.approx(report["sites"]["sites"]["2013"]["accuracy"])
    # by hand: 2013 patients (label, P, fold threshold): (0,.40,.3) wrong, (1,.35,.3) right, (1,.55,.6) wrong,
    # (0,.58,.6) right, (1,.50,.45) right -> 3/5; at 0.5 it would have been 2/5
    assert cohort["accuracy"] == pytest.approx(3 / 5) and cohort["n"] == 5
    assert cohort["auc_ci"]["method"].startswith("Newcombe")


# ----------------------------------------------------------------------------------- per fold first, pooled beside it
def test_the_headline_is_the_mean_of_the_folds_with_the_pooled_auc_beside_it(cv):
    results, report, _ = cv
    h = report["headline"]
    assert h["auc_mean_of_folds"] == report["mean"]["auc"] and h["auc_folds"] == 2
    assert h["auc_pooled"] == report["pooled"]["auc"] and h["auc_pooled_ci95"] is not None
    assert "different models" in h["explanation"]
    md = (results / "summary.md").read_text()
    assert md.index("## Headline") < md.index("## Per fold") < md.index("## Pooled out-of-fold")
    assert "Mean of the per-fold AUCs" in md and h["explanation"] in md
    assert json.loads((results / "summary.json").read_text())["headline"]["explanation"] == h["explanation"]


def test_every_method_is_named(cv):
    results, report, _ = cv
    methods = json.loads((results / "summary.json").read_text())["methods"]
    assert methods["auc_ci"].startswith("Newcombe (2006)") and "Wilson" in methods["rates_ci"]
    assert "10 equal-width bins" in methods["ece"] and "stratified" in methods["auc_bootstrap"]
    assert report["pooled"]["calibration"]["binning"].startswith("10 equal-width")
    assert report["pooled"]["auc_ci"]["method"] == stats.AUC_CI_METHOD


# ----------------------------------------------------------------------------------- sites
def test_ids_that_name_no_site_are_counted_apart_not_as_a_site():
    ids = ["Brats18_CBICA_1_1", "Brats18_CBICA_2_1", "Brats18_2013_3_1", "Brats18_2013_4_1", "x_1", "x_2"]
    audit = site_audit(ids, [1, 1, 1, 0, 1, 1])
    assert audit["sites"]["unknown"]["single_grade"] is None  # not "a single-grade site"
    assert audit["known_sites"] == 2 and audit["patients_with_known_site"] == 4
    assert audit["patients_in_single_grade_sites"] == 2 and audit["patients_with_unknown_site"] == 2
    warning = site_warning(audit)
    assert "2 of 4 patients with a known site" in warning and "2 more patients" in warning


def test_the_site_baseline_does_not_learn_unknown_ids_as_one_site():
    # every id without a site is HGG in training: were "unknown" a site (or the reference category), the baseline
    # would call the held-out unknown patients HGG with confidence; they get the training prior instead
    train = [f"p_{i}" for i in range(8)] + [f"Brats18_TCIA10_{i}_1" for i in range(8)]
    val = ["p_x", "Brats18_TCIA10_x_1"]
    ids, labels = train + val, [1] * 8 + [0] * 8 + [1, 0]
    folds = {"folds": [{"fold": 0, "train": train, "val": val}]}
    res = site_baseline(ids, labels, folds, protocol="outer")
    p_unknown = dict(zip(res["ids"], res["probs"], strict=True))["p_x"]
    assert p_unknown == pytest.approx(0.5)  # the prior: 8 HGG of 16 training patients
