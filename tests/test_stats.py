"""Checks of gliograde.evaluation.stats against published values, sklearn and closed-form results."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from gliograde.evaluation import stats as st
from gliograde.evaluation.calibration import OperatingPoint


def _separable_noise(n: int, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2, dtype=int), np.zeros(n - n // 2, dtype=int)]
    return y, y * shift + rng.normal(size=n)


# ------------------------------------------------------------------------------------------------ Wilson
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_newcombe_1998(k, n, low, high):
    lo, hi = st.wilson(k, n)
    assert round(lo, 4) == pytest.approx(low, abs=1e-12)
    assert round(hi, 4) == pytest.approx(high, abs=1e-12)


def test_wilson_empty_and_invalid():
    lo, hi = st.wilson(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="k <= n"):
        st.wilson(5, 3)


# ------------------------------------------------------------------------------------------------ DeLong
def test_delong_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    s = np.round(y * 0.8 + rng.normal(size=150), 1)  # rounding creates ties
    r = st.delong_auc(y, s)
    assert r["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["n"] == 150 and r["n_pos"] == int(y.sum()) and r["n_neg"] == 150 - int(y.sum())
    assert 0 < r["ci_low"] < r["auc"] < r["ci_high"] < 1


def test_delong_se_close_to_bootstrap_se():
    y, s = _separable_noise(300, 1.0, seed=2)
    d = st.delong_auc(y, s)
    b = st.bootstrap_auc(y, s, n_boot=2000, seed=0)
    assert b["auc"] == pytest.approx(d["auc"], abs=1e-12)
    assert d["se"] == pytest.approx(b["se"], rel=0.2)
    # percentile CI and logit DeLong CI roughly agree
    assert b["ci_low"] == pytest.approx(d["ci_low"], abs=0.03)
    assert b["ci_high"] == pytest.approx(d["ci_high"], abs=0.03)


def test_delong_se_hanley_mcneil_ballpark():
    # Hanley & McNeil (1982) SE approximation for comparison
    y, s = _separable_noise(400, 1.5, seed=3)
    r = st.delong_auc(y, s)
    a, m, n = r["auc"], r["n_pos"], r["n_neg"]
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    hm = math.sqrt((a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n))
    assert r["se"] == pytest.approx(hm, rel=0.2)


def test_delong_one_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        st.delong_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_validation_messages():
    with pytest.raises(ValueError, match="length"):
        st.delong_auc([0, 1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        st.delong_auc([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4])
    with pytest.raises(ValueError, match="0/1"):
        st.brier([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.brier([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="one-dimensional"):
        st.brier([[0, 1]], [[0.1, 0.2]])


def test_delong_paired_identical_scores():
    y, s = _separable_noise(100, 1.0, seed=4)
    r = st.delong_paired(y, s, s)
    assert r["delta"] == 0.0 and r["se"] == 0.0
    assert r["p_value"] == 1.0 and r["z"] == 0.0


def test_delong_paired_strong_vs_noise():
    rng = np.random.default_rng(5)
    y, strong = _separable_noise(200, 2.0, seed=6)
    noise = rng.normal(size=200)
    r = st.delong_paired(y, strong, noise)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, strong))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, noise))
    assert r["delta"] > 0.2 and r["p_value"] < 0.01
    assert r["ci_low"] < r["delta"] < r["ci_high"] and r["ci_low"] > 0
    # z matches delta/se; p matches the normal tail
    assert r["z"] == pytest.approx(r["delta"] / r["se"])
    assert r["p_value"] == pytest.approx(2 * sps.norm.sf(abs(r["z"])))
    # paired bootstrap agrees in direction and significance
    b = st.paired_bootstrap_delta_auc(y, strong, noise, n_boot=500, seed=0)
    assert b["delta"] == pytest.approx(r["delta"], abs=1e-12)
    assert b["p_value"] == pytest.approx(2 / 501) and b["ci_low"] > 0


def test_delong_paired_same_model_no_difference():
    rng = np.random.default_rng(7)
    y, s = _separable_noise(200, 1.0, seed=8)
    r = st.delong_paired(y, s, s + 0.05 * rng.normal(size=200))
    assert r["p_value"] > 0.05


def test_paired_bootstrap_identical_is_p1():
    y, s = _separable_noise(60, 1.0, seed=9)
    r = st.paired_bootstrap_delta_auc(y, s, s, n_boot=200)
    assert r["delta"] == 0.0 and r["p_value"] == 1.0


# ------------------------------------------------------------------------------------------------ rates
def test_rates_with_ci_counts_and_ba():
    y = np.array([1] * 10 + [0] * 20)
    p = np.array([0.9] * 8 + [0.1] * 2 + [0.8] * 5 + [0.2] * 15)
    r = st.rates_with_ci(y, p, threshold=0.5)
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (8, 2, 15, 5)
    assert r["sensitivity"]["value"] == pytest.approx(0.8)
    assert (r["sensitivity"]["ci_low"], r["sensitivity"]["ci_high"]) == pytest.approx(st.wilson(8, 10))
    assert r["specificity"]["value"] == pytest.approx(0.75)
    assert r["ppv"]["value"] == pytest.approx(8 / 13) and r["ppv"]["n"] == 13
    assert r["npv"]["value"] == pytest.approx(15 / 17) and r["npv"]["n"] == 17
    assert r["accuracy"]["value"] == pytest.approx(23 / 30)
    ba = r["balanced_accuracy"]
    assert ba["value"] == pytest.approx(0.775)
    var = (0.8 * 0.2 / 10 + 0.75 * 0.25 / 20) / 4
    n_eff = 0.775 * 0.225 / var
    assert ba["n"] == pytest.approx(n_eff) and ba["k"] == pytest.approx(0.775 * n_eff)
    assert (ba["ci_low"], ba["ci_high"]) == pytest.approx(st.wilson(0.775 * n_eff, n_eff))
    # narrower than the naive average of the sens/spec Wilson bounds
    naive_lo = (r["sensitivity"]["ci_low"] + r["specificity"]["ci_low"]) / 2
    naive_hi = (r["sensitivity"]["ci_high"] + r["specificity"]["ci_high"]) / 2
    assert ba["ci_high"] - ba["ci_low"] < naive_hi - naive_lo


def test_rates_perfect_classifier_has_finite_ba_ci():
    y = np.array([1] * 5 + [0] * 5)
    r = st.rates_with_ci(y, y * 0.9 + 0.05, 0.5)
    ba = r["balanced_accuracy"]
    assert ba["value"] == 1.0 and ba["ci_high"] == 1.0 and 0.5 < ba["ci_low"] < 1.0


# ------------------------------------------------------------------------------------------------ calibration
def test_brier_known():
    assert st.brier([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.0]) == pytest.approx((0.01 + 0.04 + 0.36 + 0.0) / 4)


def test_ece_calibrated_and_miscalibrated():
    rng = np.random.default_rng(10)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    assert st.ece(y, p) < 0.03
    assert st.ece(y, p**3) > 0.1


def test_ece_hand_computed():
    # bins [0,.1)...; 0.05,0.05 in bin 0 (frac 0.5), 0.95, 1.0 in bin 9 (frac 1)
    y, p = [0, 1, 1, 1], [0.05, 0.05, 0.95, 1.0]
    assert st.ece(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)


def test_reliability_bins():
    r = st.reliability([0, 1, 1, 0], [0.05, 0.15, 0.15, 1.0], n_bins=10)
    assert r["bin_edges"].shape == (11,)
    assert r["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert r["mean_pred"][1] == pytest.approx(0.15) and r["frac_pos"][1] == 1.0
    assert np.isnan(r["mean_pred"][2]) and np.isnan(r["frac_pos"][2])


def test_reliability_figure_lines():
    rng = np.random.default_rng(11)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < p).astype(int)
    fig = st.reliability_figure({"raw": st.reliability(y, p), "cubed": st.reliability(y, p**3)})
    assert isinstance(fig, Figure)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    assert lines[0].get_xdata().tolist() == [0.0, 1.0] and lines[0].get_ydata().tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ thresholds
def test_youden_separates():
    y = np.array([0] * 6 + [1] * 6)
    p = np.array([0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    t = st.youden_threshold(y, p)
    assert np.all(p[y == 1] >= t) and np.all(p[y == 0] < t)
    assert math.isfinite(t)


def test_youden_tie_prefers_near_half():
    # J = 0.5 is reached at t=0.9 (sens .5, spec 1) and at t=0.2 (sens 1, spec .5)
    y = [0, 0, 1, 1]
    p = [0.1, 0.3, 0.2, 0.9]
    assert st.youden_threshold(y, p) == 0.2  # |0.2-0.5| < |0.9-0.5|; t=0.3 has J=0


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_at_specificity_achieves_target(target):
    y, s = _separable_noise(201, 1.0, seed=12)
    p = 1 / (1 + np.exp(-s))
    t = st.threshold_at_specificity(y, p, target)
    spec = np.mean(p[y == 0] < t)
    assert spec >= target
    # lowest: any lower candidate score fails the target
    lower = np.unique(p)[np.unique(p) < t]
    if lower.size:
        assert np.mean(p[y == 0] < lower.max()) < target
    r = st.sensitivity_at_specificity(y, p, target)
    assert r["threshold"] == t and r["specificity"] == spec
    assert r["sensitivity"] == pytest.approx(np.mean(p[y == 1] >= t))


# ------------------------------------------------------------------------------------------------ recalibration
def test_logit_sigmoid_roundtrip():
    p = np.array([1e-3, 0.2, 0.5, 0.9])
    assert st.sigmoid(st.logit(p)) == pytest.approx(p)
    assert st.logit([0.0, 1.0]).tolist() == [-np.inf, np.inf]  # no clipping: the ends stay the ends
    assert np.isfinite(st.logit([0.0, 1.0], eps=1e-6)).all()  # clipping on request only
    tiny = np.array([1e-9, 1e-8, 1e-7, 1 - 1e-7, 1 - 1e-8])  # tied by the former clip at 1e-6
    assert np.all(np.diff(st.logit(tiny)) > 0) and np.all(np.diff(OperatingPoint(0.8, 0.5).apply(tiny)) > 0)


def test_the_prior_shift_of_the_operating_point():
    p = np.array([0.1, 0.5, 0.77])
    assert OperatingPoint(0.3, 0.3).apply(p) == pytest.approx(p)
    assert OperatingPoint(0.7, 0.5).apply([0.5]) == pytest.approx([0.7])
    with pytest.raises(ValueError, match="train_prior"):
        OperatingPoint(1.0, 0.5).apply(p)


def test_fit_temperature_recovers_two():
    rng = np.random.default_rng(13)
    z = rng.normal(scale=4.0, size=5000)
    y = (rng.uniform(size=z.size) < st.sigmoid(z / 2.0)).astype(int)
    t_logits = st.fit_temperature(y, z, from_probs=False)
    t_probs = st.fit_temperature(y, st.sigmoid(z))
    assert t_logits == pytest.approx(2.0, rel=0.15)
    assert t_probs == pytest.approx(2.0, rel=0.15)
    calibrated = OperatingPoint(0.5, 0.5, temperature=t_probs).apply(st.sigmoid(z))  # no prior shift: T only
    assert st.ece(y, calibrated) < st.ece(y, st.sigmoid(z))


# ------------------------------------------------------------------------------------------------ paired tests
def test_mcnemar_exact():
    a = np.array([False] * 10 + [True] * 20)
    b = np.array([True] * 10 + [True] * 20)
    r = st.mcnemar_exact(a, b)
    assert (r["b"], r["c"]) == (0, 10)
    assert r["p_value"] == pytest.approx(2 * 0.5**10)
    assert st.mcnemar_exact(a, a)["p_value"] == 1.0


def test_corrected_resampled_ttest_formula():
    d = np.array([0.02, 0.05, -0.01, 0.03, 0.04, 0.00, 0.06, 0.01, 0.02, 0.03])
    r = st.corrected_resampled_ttest(d, n_train=80, n_test=20)
    j = d.size
    t = d.mean() / math.sqrt(d.var(ddof=1) * (1 / j + 20 / 80))
    assert r["mean"] == pytest.approx(d.mean())
    assert r["t"] == pytest.approx(t) and r["df"] == j - 1
    assert r["p_value"] == pytest.approx(2 * sps.t.sf(abs(t), j - 1))
    # the correction is conservative relative to the naive t-test
    assert r["p_value"] > sps.ttest_1samp(d, 0).pvalue
