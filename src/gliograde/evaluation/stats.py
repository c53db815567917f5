"""Honest statistics for binary classification (label 1 = HGG positive): confidence intervals, paired tests,
calibration and threshold selection. numpy + scipy + scikit-learn (+ matplotlib's object API for one figure).

Conventions: a case is called positive when ``prob >= threshold`` (the same rule as ``sklearn.metrics.roc_curve``);
all 95% intervals use ``z = 1.959963984540054`` unless stated otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special
from scipy import stats as sps
from sklearn.metrics import roc_curve

Z95 = 1.959963984540054

__all__ = [
    "AUC_CI_METHOD",
    "auc_interval",
    "bootstrap_auc",
    "brier",
    "corrected_resampled_ttest",
    "delong_auc",
    "delong_paired",
    "ece",
    "fit_temperature",
    "logit",
    "mcnemar_exact",
    "newcombe_auc_ci",
    "paired_bootstrap_delta_auc",
    "rates_with_ci",
    "reliability",
    "reliability_figure",
    "sensitivity_at_specificity",
    "separated",
    "sigmoid",
    "temperature_fit",
    "threshold_at_specificity",
    "wilson",
    "youden_threshold",
]


# --------------------------------------------------------------------------------------------------- validation
def _vector(x, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has length {arr.size} but labels have length {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} non-finite value(s) (nan/inf)")
    return arr


def _labels(labels) -> np.ndarray:
    arr = _vector(labels, "labels")
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0/1, found other values such as {arr[bad][:3].tolist()}")
    return arr.astype(np.int64)


def _probs(probs, n: int | None = None, name: str = "probs") -> np.ndarray:
    arr = _vector(probs, name, n)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min():g}, {arr.max():g}]")
    return arr


def _both_classes(y: np.ndarray, minimum: int = 1) -> tuple[int, int]:
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels contain only one class (n_pos={n_pos}, n_neg={n_neg}); AUC is undefined")
    if n_pos < minimum or n_neg < minimum:
        raise ValueError(f"need at least {minimum} positives and {minimum} negatives, got n_pos={n_pos}, n_neg={n_neg}")
    return n_pos, n_neg


def prob_array(x, name: str = "probs") -> np.ndarray:
    """Any-shape probabilities in [0, 1], all finite (for element-wise transforms)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite value(s) (nan/inf)")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min():g}, {arr.max():g}]")
    return arr


# --------------------------------------------------------------------------------------------------- DeLong
def _delong_core(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs (k,) and their covariance (k, k) for score rows ``scores`` (k, N)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = sps.rankdata(pos, axis=1)  # midranks within positives
    ty = sps.rankdata(neg, axis=1)  # midranks within negatives
    tz = sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks over all
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # structural components of negatives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def delong_auc(labels, scores, z: float = Z95) -> dict:
    """ROC AUC with its DeLong standard error (fast midrank algorithm of Sun & Xu 2014) and a 95% CI.

    The CI is built on the logit scale, ``expit(logit(auc) ± z·se/(auc(1-auc)))``, so it stays inside (0, 1);
    when AUC is exactly 0 or 1 (or se is 0) it falls back to the normal interval clipped to [0, 1], which then has
    zero width: ``degenerate`` is True and the interval must not be reported (use :func:`auc_interval`, whose
    Newcombe interval does not collapse). Needs at least 2 cases of each class (sample variances per class).
    """
    y = _labels(labels)
    s = _vector(scores, "scores", y.size)
    n_pos, n_neg = _both_classes(y, minimum=2)
    aucs, cov = _delong_core(y, s[None, :])
    auc, se = float(aucs[0]), float(math.sqrt(max(cov[0, 0], 0.0)))
    if 0.0 < auc < 1.0 and se > 0.0:
        centre, half = special.logit(auc), z * se / (auc * (1.0 - auc))
        lo, hi = float(special.expit(centre - half)), float(special.expit(centre + half))
    else:
        lo, hi = max(0.0, auc - z * se), min(1.0, auc + z * se)
    return {"auc": auc, "se": se, "ci_low": lo, "ci_high": hi, "n": int(y.size), "n_pos": n_pos, "n_neg": n_neg,
            "degenerate": not (1e-12 < auc < 1.0 - 1e-12 and se > 1e-12), "method": DELONG_METHOD}  # fmt: skip


# --------------------------------------------------------------------------------------------------- Newcombe
AUC_CI_METHOD = (
    "Newcombe (2006) score interval for the Mann-Whitney AUC, method 5 (Stat Med 25:559-573): the roots of "
    "(AUC_hat - theta)^2 = z^2 V(theta), V the Hanley-McNeil variance with both group sizes replaced by (m + n)/2"
)
DELONG_METHOD = "DeLong (fast midrank algorithm, Sun & Xu 2014), interval on the logit scale"


def _newcombe_variance(theta: float, m: int, n: int) -> float:
    """Newcombe's (2006) method-4 variance: Hanley-McNeil's with m* = n* = (m + n)/2 - 1 in place of n - 1, m - 1."""
    star = (m + n) / 2.0 - 1.0
    return theta * (1.0 - theta) * (1.0 + star * (1.0 - theta) / (2.0 - theta) + star * theta / (1.0 + theta)) / (m * n)


def _newcombe_lower(auc: float, m: int, n: int, z: float) -> float:
    """The lower root of (auc - theta)^2 = z^2 V(theta) in [0, auc]: where (auc - theta)/sqrt(V(theta)) falls to z.
    V vanishes only at 0 and 1, so the ratio runs from +inf (theta -> 0) to 0 at theta = auc: one crossing."""
    if auc <= 0.0:
        return 0.0
    hi = min(auc, 1.0 - 1e-13)  # at auc = 1 the ratio tends to 0 as theta -> 1; stop just short of the 0/0

    def excess(theta: float) -> float:
        return (auc - theta) / math.sqrt(_newcombe_variance(theta, m, n)) - z

    lo = min(1e-300, hi / 2)
    if excess(hi) >= 0.0:  # only when auc sits within rounding of 1 and z is tiny
        return float(hi)
    return float(optimize.brentq(excess, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500))


def newcombe_auc_ci(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (2006, method 5) score-type 95 % interval for an AUC from n_pos positives and n_neg negatives.

    Like Wilson's interval for a proportion it inverts the test rather than adding ±z·se, so it keeps a width at
    AUC = 0 or 1 and with three patients in a group (9 HGG vs 3 LGG perfectly separated: 0.621-1). The variance is
    symmetric, V(theta) = V(1 - theta), so the upper limit is 1 - the lower limit of 1 - AUC.
    """
    auc, m, n = float(auc), int(n_pos), int(n_neg)
    if m < 1 or n < 1:
        raise ValueError(f"need at least one positive and one negative, got n_pos={m}, n_neg={n}")
    if not (0.0 <= auc <= 1.0):
        raise ValueError(f"auc must lie in [0, 1], got {auc}")
    return _newcombe_lower(auc, m, n, z), 1.0 - _newcombe_lower(1.0 - auc, m, n, z)


def auc_interval(labels, scores, z: float = Z95) -> dict:
    """The AUC (Mann-Whitney, ties 1/2) with the interval every table reports: Newcombe's score interval
    (:func:`newcombe_auc_ci`), which stays honest at AUC = 0 or 1, with all scores tied, and with few patients of a
    grade. Needs one patient of each grade."""
    y = _labels(labels)
    s = _vector(scores, "scores", y.size)
    n_pos, n_neg = _both_classes(y)
    auc = _auc_fast(s[y == 1], s[y == 0])
    lo, hi = newcombe_auc_ci(auc, n_pos, n_neg, z)
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "n": int(y.size), "n_pos": n_pos, "n_neg": n_neg,
            "method": AUC_CI_METHOD}  # fmt: skip


def delong_paired(labels, scores_a, scores_b, z: float = Z95) -> dict:
    """Two-sided DeLong test of AUC(a) - AUC(b) for two scorings of the same cases, with a normal 95% CI on delta.

    When the standard error of the difference is 0 (e.g. identical scores) z is 0 and p is 1 if delta is 0;
    a non-zero delta with zero se has no defined test and gives z = p = nan.
    """
    y = _labels(labels)
    a = _vector(scores_a, "scores_a", y.size)
    b = _vector(scores_b, "scores_b", y.size)
    _both_classes(y, minimum=2)
    aucs, cov = _delong_core(y, np.vstack([a, b]))
    delta = float(aucs[0] - aucs[1])
    se = float(math.sqrt(max(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1], 0.0)))
    if se > 1e-15:
        zstat = delta / se
        p = float(2.0 * sps.norm.sf(abs(zstat)))
    elif abs(delta) <= 1e-15:
        zstat, p = 0.0, 1.0
    else:
        zstat, p = math.nan, math.nan
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "delta": delta,
        "se": se,
        "z": float(zstat),
        "p_value": min(1.0, p) if not math.isnan(p) else p,
        "ci_low": max(-1.0, delta - z * se),
        "ci_high": min(1.0, delta + z * se),
    }


# --------------------------------------------------------------------------------------------------- proportions
def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (k, n may be non-integer effective counts); n=0 → (nan, nan)."""
    k, n = float(k), float(n)
    if not (math.isfinite(k) and math.isfinite(n)) or n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs finite 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact endpoints where rounding would miss them
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def _rate(k: float, n: float, z: float) -> dict:
    lo, hi = wilson(k, n, z)
    value = k / n if n > 0 else math.nan
    return {"value": float(value), "ci_low": lo, "ci_high": hi, "k": k, "n": n}


def rates_with_ci(labels, probs, threshold: float = 0.5, z: float = Z95) -> dict:
    """Sensitivity, specificity, balanced accuracy, accuracy, PPV and NPV at ``prob >= threshold``, each as
    ``{value, ci_low, ci_high, k, n}`` with a Wilson interval; the confusion counts are included too.

    Balanced accuracy BA = (sens + spec)/2 is not a binomial proportion, and averaging the two Wilson bounds is
    wrong (too wide). Its CI is a Wilson interval on an *effective* sample size with the same variance:
    ``var = (s(1-s)/n_pos + p(1-p)/n_neg)/4``, ``n_eff = BA(1-BA)/var``, ``k_eff = BA·n_eff``. When var is 0
    (sens and spec both 0 or 1) ``n_eff = 4/(1/n_pos + 1/n_neg)``, the value the formula takes when sens = spec.
    Undefined rates (empty denominators) are nan.
    """
    y = _labels(labels)
    p = _probs(probs, y.size)
    t = np.asarray(threshold, dtype=np.float64)  # one threshold, or one per case (each fold's own)
    if t.ndim and t.shape != p.shape:
        raise ValueError(f"threshold: {t.shape} thresholds for {p.size} cases")
    pred = p >= t
    tp = int(np.sum(pred & (y == 1)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    n_pos, n_neg = tp + fn, tn + fp
    out = {
        "threshold": float(t) if t.ndim == 0 else "per case",
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _rate(tp, n_pos, z),
        "specificity": _rate(tn, n_neg, z),
        "accuracy": _rate(tp + tn, y.size, z),
        "ppv": _rate(tp, tp + fp, z),
        "npv": _rate(tn, tn + fn, z),
    }
    if n_pos == 0 or n_neg == 0:
        out["balanced_accuracy"] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "k": 0.0, "n": 0.0}
        return out
    sens, spec = tp / n_pos, tn / n_neg
    ba = 0.5 * (sens + spec)
    var = (sens * (1.0 - sens) / n_pos + spec * (1.0 - spec) / n_neg) / 4.0
    n_eff = ba * (1.0 - ba) / var if var > 0 else 4.0 / (1.0 / n_pos + 1.0 / n_neg)
    k_eff = ba * n_eff
    lo, hi = wilson(min(k_eff, n_eff), n_eff, z)
    out["balanced_accuracy"] = {"value": float(ba), "ci_low": lo, "ci_high": hi, "k": float(k_eff), "n": float(n_eff)}
    return out


# --------------------------------------------------------------------------------------------------- bootstrap
def _auc_fast(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2) via midranks."""
    m, n = pos.size, neg.size
    ranks = sps.rankdata(np.concatenate([pos, neg]))
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def _check_boot(n_boot: int) -> int:
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return n_boot


def bootstrap_auc(labels, scores, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC with a stratified (resample positives and negatives separately) percentile bootstrap CI.

    Also returns ``se``, the standard deviation of the bootstrap AUCs.
    """
    y = _labels(labels)
    s = _vector(scores, "scores", y.size)
    _both_classes(y)
    n_boot = _check_boot(n_boot)
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        boots[i] = _auc_fast(rng.choice(pos, pos.size), rng.choice(neg, neg.size))
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {
        "auc": _auc_fast(pos, neg),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "se": float(boots.std(ddof=1)) if n_boot > 1 else math.nan,
        "n_boot": n_boot,
    }


def paired_bootstrap_delta_auc(labels, a, b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(a) - AUC(b) with a stratified paired bootstrap (same resampled cases for both) percentile CI.

    ``p_value = min(1, 2·(1 + min(#{delta* <= 0}, #{delta* >= 0})) / (n_boot + 1))``: the two-sided share of
    bootstrap deltas on the far side of 0, with the +1 correction so that p is never 0.
    """
    y = _labels(labels)
    sa = _vector(a, "a", y.size)
    sb = _vector(b, "b", y.size)
    _both_classes(y)
    n_boot = _check_boot(n_boot)
    ipos, ineg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        bp, bn = rng.choice(ipos, ipos.size), rng.choice(ineg, ineg.size)
        deltas[i] = _auc_fast(sa[bp], sa[bn]) - _auc_fast(sb[bp], sb[bn])
    lo, hi = np.quantile(deltas, [alpha / 2.0, 1.0 - alpha / 2.0])
    tail = min(int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0)))
    p = min(1.0, 2.0 * (1.0 + tail) / (n_boot + 1.0))
    delta = _auc_fast(sa[ipos], sa[ineg]) - _auc_fast(sb[ipos], sb[ineg])
    return {"delta": float(delta), "ci_low": float(lo), "ci_high": float(hi), "p_value": p, "n_boot": n_boot}


# --------------------------------------------------------------------------------------------------- calibration
def brier(labels, probs) -> float:
    """Brier score: mean squared difference between P(HGG) and the 0/1 label."""
    y = _labels(labels)
    p = _probs(probs, y.size)
    return float(np.mean((p - y) ** 2))


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)  # equal width, last bin closed at 1


def reliability(labels, probs, n_bins: int = 10) -> dict:
    """Reliability-diagram data on equal-width bins of [0, 1]: ``bin_edges`` (n_bins+1), and per bin
    ``mean_pred``, ``frac_pos`` (nan for empty bins) and ``count`` (0 for empty bins)."""
    y = _labels(labels)
    p = _probs(probs, y.size)
    n_bins = int(n_bins)
    idx = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, np.bincount(idx, weights=p, minlength=n_bins) / count, np.nan)
        frac_pos = np.where(count > 0, np.bincount(idx, weights=y, minlength=n_bins) / count, np.nan)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1),
        "mean_pred": mean_pred,
        "frac_pos": frac_pos,
        "count": count.astype(np.int64),
    }


def ece(labels, probs, n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of (bin count / N) · |mean prob - fraction positive|."""
    r = reliability(labels, probs, n_bins)
    ok = r["count"] > 0
    w = r["count"][ok] / r["count"].sum()
    return float(np.sum(w * np.abs(r["mean_pred"][ok] - r["frac_pos"][ok])))


def reliability_figure(curves: dict, title: str = "Reliability"):
    """A matplotlib ``Figure`` (object API, no pyplot state) with the diagonal and one line per named
    reliability dict (empty bins skipped). Save with ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    from gliograde.evaluation.plots import readable_legend

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for name, r in curves.items():
        count = np.asarray(r["count"])
        ok = count > 0
        ax.plot(np.asarray(r["mean_pred"])[ok], np.asarray(r["frac_pos"])[ok], marker="o", label=str(name))
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("mean predicted P(HGG)")
    ax.set_ylabel("fraction HGG")
    ax.set_title(title)
    readable_legend(ax, loc="upper left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------- thresholds
def youden_threshold(labels, probs) -> float:
    """Threshold maximising Youden's J = sens + spec - 1 over ``roc_curve`` thresholds (rule ``prob >= t``).

    Ties are broken by the threshold closest to 0.5; sklearn's infinite first threshold is clipped to 1.0.
    """
    y = _labels(labels)
    p = _vector(probs, "probs", y.size)
    _both_classes(y)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(thr[best[np.argmin(np.abs(thr[best] - 0.5))]])


def threshold_at_specificity(labels, probs, specificity: float) -> float:
    """Lowest threshold t (rule ``prob >= t``) whose specificity on the negatives is >= ``specificity``.

    Candidates are the distinct scores and one value just above the largest, so the answer is always attainable.
    """
    y = _labels(labels)
    p = _vector(probs, "probs", y.size)
    _both_classes(y)
    target = float(specificity)
    if not (0.0 <= target <= 1.0):
        raise ValueError(f"specificity must lie in [0, 1], got {specificity}")
    neg = np.sort(p[y == 0])
    cand = np.append(np.unique(p), np.nextafter(p.max(), np.inf))
    spec = np.searchsorted(neg, cand, side="left") / neg.size  # share of negatives strictly below t
    ok = np.flatnonzero(spec >= target - 1e-12)
    return float(cand[ok[0]])


def sensitivity_at_specificity(labels, probs, specificity: float) -> dict:
    """Sensitivity at :func:`threshold_at_specificity`, with the achieved specificity."""
    y = _labels(labels)
    p = _vector(probs, "probs", y.size)
    t = threshold_at_specificity(y, p, specificity)
    return {
        "threshold": t,
        "sensitivity": float(np.mean(p[y == 1] >= t)),
        "specificity": float(np.mean(p[y == 0] < t)),
    }


# --------------------------------------------------------------------------------------------------- recalibration
def logit(p, eps: float | None = None) -> np.ndarray:
    """log(p/(1-p)) in float64: -inf at 0 and +inf at 1, so that shifting and scaling it keeps every distinct
    probability distinct (clipping at eps would tie the values beyond it and change the AUC). ``eps``: clip to
    [eps, 1-eps] first, for a caller that needs finite values."""
    q = np.asarray(p, dtype=np.float64)
    if eps is not None:
        q = np.clip(q, eps, 1.0 - eps)
    with np.errstate(divide="ignore"):
        return np.log(q) - np.log1p(-q)


def sigmoid(x) -> np.ndarray:
    """Numerically stable logistic function."""
    return special.expit(np.asarray(x, dtype=np.float64))


T_BOUNDS = (0.05, 20.0)


def _temperature_nll(y: np.ndarray, z: np.ndarray, t: float) -> float:
    """Mean NLL of sigmoid(z / t): log(1 + e^-s) for HGG, log(1 + e^s) for LGG (finite at z = ±inf where right)."""
    s = z / t
    return float(np.mean(np.where(y == 1, np.logaddexp(0.0, -s), np.logaddexp(0.0, s))))


def fit_temperature(labels, logits_or_probs, from_probs: bool = True) -> float:
    """Temperature T minimising the mean NLL of ``sigmoid(logit / T)``; bounded scalar search on log T in
    [log 0.05, log 20]. Inputs are probabilities (converted with :func:`logit`) unless ``from_probs=False``.
    On separable data the minimum lies at T -> 0 and the search stops at the bound: see :func:`temperature_fit`."""
    y = _labels(labels)
    x = _probs(logits_or_probs, y.size, "probs") if from_probs else _vector(logits_or_probs, "logits", y.size)
    z = logit(x) if from_probs else x
    lo, hi = (math.log(b) for b in T_BOUNDS)
    res = optimize.minimize_scalar(lambda lt: _temperature_nll(y, z, math.exp(lt)), bounds=(lo, hi), method="bounded")
    return float(math.exp(res.x))


def separated(labels, scores) -> bool:
    """True when a threshold puts every HGG above every LGG (min HGG score > max LGG score): the maximum-likelihood
    temperature is then 0 and any fitted T is just the search bound."""
    y = _labels(labels)
    s = np.asarray(scores, dtype=np.float64)  # logits may be ±inf
    if s.shape != y.shape or np.isnan(s).any():
        raise ValueError(f"scores: {s.shape} values (nan-free) needed for {y.size} labels")
    if y.min() == y.max():
        return False
    return bool(np.min(s[y == 1]) > np.max(s[y == 0]))


def temperature_fit(labels, probs) -> dict:
    """:func:`fit_temperature` with its failure modes named: {"temperature", "rule"}. A separable set (every HGG
    above every LGG), a fit that ends on a bound of [0.05, 20] or an NLL that is infinite whatever T (a grade
    scored 0 or 1 with certainty, wrongly) give T = 1 (no scaling) and a rule saying why."""
    y = _labels(labels)
    p = _probs(probs, y.size)
    z = logit(p)
    if separated(y, z):
        return {"temperature": 1.0, "rule": "1 (fallback: the selection part is separable, every HGG scored above "
                "every LGG, so the fitted temperature would run to its bound and push P(HGG) to 0/1)"}  # fmt: skip
    if not math.isfinite(_temperature_nll(y, z, 1.0)):
        return {"temperature": 1.0, "rule": "1 (fallback: a patient is scored 0 or 1 against its grade; the NLL is "
                "infinite at every temperature)"}  # fmt: skip
    t = fit_temperature(y, p)
    if not (T_BOUNDS[0] * 1.001 < t < T_BOUNDS[1] / 1.001):
        return {"temperature": 1.0, "rule": f"1 (fallback: the fit ended on its bound, T = {t:.3g})"}
    return {"temperature": t, "rule": "fitted (NLL on the selection part)"}


# --------------------------------------------------------------------------------------------------- paired tests
def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test: binomial test (p=0.5) on the discordant pairs.

    ``b`` = cases a gets right and b wrong, ``c`` = a wrong and b right; no discordant pairs gives p = 1.
    """
    a = _vector(correct_a, "correct_a")
    bb = _vector(correct_b, "correct_b", a.size)
    for arr, name in ((a, "correct_a"), (bb, "correct_b")):
        if not np.all(np.isin(arr, (0.0, 1.0))):
            raise ValueError(f"{name} must be boolean / 0-1")
    a, bb = a.astype(bool), bb.astype(bool)
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "p_value": min(1.0, p)}


def corrected_resampled_ttest(diffs, n_train: int, n_test: int) -> dict:
    """Nadeau & Bengio (2003) corrected resampled t-test on J per-split score differences.

    ``t = mean / sqrt(var·(1/J + n_test/n_train))`` with the sample variance (ddof=1), df = J-1, two-sided p.
    Zero variance gives t = 0, p = 1 for a zero mean and t = ±inf, p = 0 otherwise.
    """
    d = _vector(diffs, "diffs")
    if d.size < 2:
        raise ValueError(f"diffs needs at least 2 values, got {d.size}")
    if int(n_train) <= 0 or int(n_test) <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    j = d.size
    mean = float(d.mean())
    var = float(d.var(ddof=1)) * (1.0 / j + int(n_test) / int(n_train))
    df = j - 1
    if var > 0:
        t = mean / math.sqrt(var)
        p = float(2.0 * sps.t.sf(abs(t), df))
    elif mean == 0:
        t, p = 0.0, 1.0
    else:
        t, p = math.copysign(math.inf, mean), 0.0
    return {"mean": mean, "t": float(t), "p_value": min(1.0, p), "df": df}


def honest_statistics(labels, probs, threshold=0.5) -> dict:
    """What a reviewer asks of pooled out-of-fold predictions beyond the point metrics: the AUC's Newcombe interval
    (``auc_ci``, the one reported) and its DeLong record (reference; ``degenerate`` where it collapses), Wilson
    intervals of the rates at the decision threshold (one, or each case's own fold's), calibration (Brier, 10-bin
    ECE, reliability curve) and the sensitivity at 90 / 95 % specificity (a threshold read off these same
    predictions: optimistic, and said so)."""
    out: dict = {}
    try:
        out["auc_ci"] = auc_interval(labels, probs)
    except ValueError as e:  # a grade absent
        out["auc_ci"] = {"error": str(e), "method": AUC_CI_METHOD}
    try:
        out["auc_delong"] = delong_auc(labels, probs)
    except ValueError as e:  # fewer than two patients of a grade
        out["auc_delong"] = {"error": str(e)}
    out["rates"] = rates_with_ci(labels, probs, threshold)
    out["rates"]["method"] = "Wilson score interval; balanced accuracy: Wilson on its effective n"
    out["calibration"] = {
        "brier": brier(labels, probs),
        "ece": ece(labels, probs, 10),
        "n_bins": 10,
        "binning": "10 equal-width bins of [0, 1], weighted by their counts",
        "reliability": {k: np.asarray(v).tolist() for k, v in reliability(labels, probs, 10).items()},
    }
    if len(np.unique(labels)) == 2:
        out["sensitivity_at_specificity"] = {
            "protocol": "threshold chosen on the reported predictions themselves (optimistic)",
            **{f"{t:.2f}": sensitivity_at_specificity(labels, probs, t) for t in (0.90, 0.95)},
        }
    return out


# --------------------------------------------------------------------------------------------------- over folds
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over the folds where the value is defined (NaN ones, e.g. the
    specificity of a fold without LGG, are left out, never counted as 0; :func:`defined` counts the rest); the mean
    is NaN with no defined value, the std with fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def defined(values) -> int:
    """How many fold values a mean stands on (the non-NaN ones)."""
    return int(np.sum(~np.isnan(np.asarray(values, dtype=np.float64))))


def delong_or_reason(labels, probs) -> dict:
    try:
        return delong_auc(labels, probs)
    except ValueError as e:
        return {"error": str(e), "n": len(labels)}


def auc_ci_or_reason(labels, probs) -> dict:
    """The reported AUC interval (Newcombe), or why there is none (a grade absent)."""
    try:
        return auc_interval(labels, probs)
    except ValueError as e:
        return {"error": str(e), "n": len(labels)}
