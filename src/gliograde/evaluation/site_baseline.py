"""The site-only baseline: how well the acquisition site alone, read from the case id, predicts the grade under the
same patient-level folds as the networks.

For each outer fold a logistic regression on one-hot site indicators is fitted on the fold's training patients and
predicts P(HGG) of its validation patients. A site unseen in training gets the intercept only, so with site-grouped
folds the baseline cannot do better than chance; a patient whose id names no site is neither fitted nor told apart:
it gets the training prior (the ids that name no site are not one site); with folds that share sites, a high baseline
AUC says how much of a network's AUC the site alone could explain.

Protocols:

- "inner": fitted on the fold's `fit` patients, decision threshold chosen on its `select` patients (Youden's J);
- "outer": fitted on all of the fold's `train` patients, threshold 0.5.

A folds file without inner splits (old schema) makes "inner" fall back to "outer", said so in the result.

The site audit (`site_audit`, `site_warning`): how many patients sit in a site that holds a single grade, for whom
the site alone predicts the grade (`summarize` and `validate` both report it).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.preprocessing import OneHotEncoder

from gliograde import GRADES
from gliograde.data.brats import UNKNOWN_SITE, site_of
from gliograde.errors import DataError

PROTOCOLS = ("inner", "outer")
MIXED_COHORT = "2013"  # the BraTS 2013 cases: the one site of BraTS 2018 with both grades
NO_INNER = "outer (no inner split in folds.json)"


def youden_threshold(labels, probs, default: float = 0.5) -> float:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) on (labels, probs): a case is called
    positive when prob >= threshold. `default` when one class is absent. Ties: the highest threshold."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if len(labels) == 0 or labels.min() == labels.max():
        return float(default)
    fpr, tpr, thresholds = roc_curve(labels, probs)
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thresholds[int(np.argmax(j))])


def _auc(labels, probs) -> float:
    labels = np.asarray(labels)
    if len(labels) == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, probs))


def _fold_entries(folds: dict, repeat: int) -> list[dict]:
    if repeat < 0:
        raise DataError(f"repeat {repeat} must be at least 0")
    if "repeat_sets" in folds:
        sets = folds["repeat_sets"]
        try:
            entry = sets[repeat] if not isinstance(sets, dict) else sets.get(repeat, sets.get(str(repeat)))
        except IndexError:
            entry = None
        if entry is None:
            raise DataError(f"repeat {repeat} is not in folds.json ({len(sets)} repeat set(s))")
        return list(entry["folds"] if isinstance(entry, dict) else entry)
    if "folds" in folds:
        if repeat != 0:
            raise DataError(f"repeat {repeat}: this folds.json holds a single set of folds (repeat 0)")
        return list(folds["folds"])
    raise DataError("not a folds dict: neither 'repeat_sets' nor 'folds' is present")


def site_model(sites: list[str], labels: np.ndarray):
    """A predict(sites) -> P(HGG) function fitted on (sites, labels); constant prior when one grade is absent.
    Patients whose id names no site (UNKNOWN_SITE) carry no site information: they are left out of the fit (were
    they kept, as a category or as all-zero rows, the model would learn "no site" as one site) and are predicted
    the training prior, P(HGG) over all the training patients."""
    if len(labels) == 0:
        raise DataError("a fold has no training patients for the site baseline")
    prior = float(labels.mean())
    known = np.array([s != UNKNOWN_SITE for s in sites], dtype=bool)
    if not known.any() or labels[known].min() == labels[known].max():
        return lambda new: np.full(len(new), prior)
    encoder = OneHotEncoder(handle_unknown="ignore")  # a site unseen in training: all zeros, the intercept
    x = encoder.fit_transform(np.array(sites, dtype=object)[known].reshape(-1, 1))
    model = LogisticRegression(C=1.0).fit(x, labels[known])

    def predict(new):
        new = np.array(new, dtype=object)
        out = np.full(len(new), prior)
        has = new != UNKNOWN_SITE
        if has.any():
            out[has] = model.predict_proba(encoder.transform(new[has].reshape(-1, 1)))[:, 1]
        return out

    return predict


def site_baseline(
    ids, labels, folds: dict, repeat: int = 0, protocol: str = "inner", sites: dict | None = None
) -> dict:
    """Out-of-fold P(HGG) from the site alone, for each outer fold of `folds` (repeat `repeat`).

    `ids` and `labels` (1 = HGG, 0 = LGG) name the patients; the folds' `train`/`fit`/`select`/`val` lists are case
    ids among them. Returns {"protocol", "per_fold": [{"fold", "auc", "n", "threshold"}], "pooled": {"auc", "n",
    "threshold_policy", "sensitivity", "specificity", "balanced_accuracy"}, "ids", "probs", "labels"}; ids/probs/
    labels are the validation patients in the order of `ids`. AUCs are NaN where a class is absent. `sites`: id ->
    site (a cohort table's site column); else the site each BraTS id names.
    """
    site_of_id = site_lookup(sites)

    if protocol not in PROTOCOLS:
        raise DataError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    ids = [str(i) for i in ids]
    labels = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} ids but {len(labels)} labels")
    label_of = dict(zip(ids, labels.tolist(), strict=True))
    entries = _fold_entries(folds, repeat)
    if protocol == "inner" and not all(e.get("fit") and e.get("select") for e in entries):
        protocol = NO_INNER
    inner = protocol == "inner"

    def part(entry: dict, name: str) -> tuple[list[str], np.ndarray]:
        unknown = [c for c in entry[name] if c not in label_of]
        if unknown:
            raise DataError(f"fold {entry.get('fold')}: {len(unknown)} {name} case(s) not among the ids: {unknown[:5]}")
        return list(entry[name]), np.array([label_of[c] for c in entry[name]], dtype=np.int64)

    per_fold, prob_of, called = [], {}, {}
    for k, entry in enumerate(entries):
        fold = entry.get("fold", k)
        train_ids, train_y = part(entry, "fit" if inner else "train")
        val_ids, val_y = part(entry, "val")
        predict = site_model([site_of_id(c) for c in train_ids], train_y)
        threshold = 0.5
        if inner:
            select_ids, select_y = part(entry, "select")
            threshold = youden_threshold(select_y, predict([site_of_id(c) for c in select_ids]))
        probs = predict([site_of_id(c) for c in val_ids]) if val_ids else np.zeros(0)
        for c, p in zip(val_ids, probs, strict=True):
            if c in prob_of:
                raise DataError(f"case {c} is in the validation part of two folds of repeat {repeat}")
            prob_of[c], called[c] = float(p), int(p >= threshold)
        per_fold.append({"fold": fold, "auc": _auc(val_y, probs), "n": len(val_ids), "threshold": threshold})

    out_ids = [c for c in ids if c in prob_of]
    out_y = np.array([label_of[c] for c in out_ids], dtype=np.int64)
    out_p = np.array([prob_of[c] for c in out_ids], dtype=np.float64)
    pred = np.array([called[c] for c in out_ids], dtype=np.int64)
    sens = float(pred[out_y == 1].mean()) if (out_y == 1).any() else math.nan
    spec = float(1 - pred[out_y == 0].mean()) if (out_y == 0).any() else math.nan
    return {
        "protocol": protocol,
        "per_fold": per_fold,
        "pooled": {
            "auc": _auc(out_y, out_p),
            "n": len(out_ids),
            "threshold_policy": "youden on select (per fold)" if inner else "fixed 0.5",
            "sensitivity": sens,
            "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2,
        },
        "ids": out_ids,
        "probs": out_p.tolist(),
        "labels": out_y.tolist(),
    }


def site_lookup(sites: dict | None):
    """id -> site: from `sites` (a cohort's, as its cache holds them; an id it lacks has no known site), else the
    site the BraTS id names."""
    if sites is None:
        return site_of
    return lambda case_id: sites.get(case_id, UNKNOWN_SITE)


def site_audit(ids: list[str], labels, preds=None, sites: dict | None = None, classes=GRADES) -> dict:
    """Cases, classes and (given predictions) accuracy per acquisition site, and how many patients sit in a site
    that holds a single class -- for them the site alone predicts the class. `sites`: id -> site (a cohort table's
    site column), else the site each BraTS id names; `classes`: the names of labels 0 and 1 (the entries' keys)."""
    labels = np.asarray(labels, dtype=np.int64)
    neg, pos = classes
    sites = list(map(site_lookup(sites), ids))
    table = {}
    for site in sorted(set(sites), key=lambda s: (s == UNKNOWN_SITE, s)):  # the ids without a site last
        rows = [k for k, s in enumerate(sites) if s == site]
        counts = Counter(int(labels[k]) for k in rows)
        entry = {"cases": len(rows), pos: counts.get(1, 0), neg: counts.get(0, 0)}
        # ids that name no site are not one site: whether "they" hold one grade says nothing
        entry["single_grade"] = None if site == UNKNOWN_SITE else entry[pos] == 0 or entry[neg] == 0
        if preds is not None:
            entry["accuracy"] = float(np.mean(np.asarray(preds)[rows] == labels[rows]))
        table[site] = entry
    confounded = sum(e["cases"] for s, e in table.items() if e["single_grade"] and s != UNKNOWN_SITE)
    known = sum(e["cases"] for s, e in table.items() if s != UNKNOWN_SITE)
    return {
        "sites": table,
        "known_sites": sum(s != UNKNOWN_SITE for s in table),
        "patients_in_single_grade_sites": confounded,
        "patients_with_known_site": known,
        "patients_with_unknown_site": len(ids) - known,
        "patients": len(ids),
    }


def site_warning(audit: dict, what: str = "grade", pointer: bool = True) -> str | None:
    """The warning where single-`what` sites (a single grade, or class of a cohort's target) could carry the AUC;
    `pointer`: end with where the CV summary shows more (its site table, the mixed-grade cohort)."""
    n, known = audit["patients_in_single_grade_sites"], audit["patients_with_known_site"]
    if known == 0 or n == 0:
        return None
    unknown = audit.get("patients_with_unknown_site", audit.get("patients", known) - known)
    apart = f" ({unknown} more patients have ids that name no site: counted apart, not as a site)" if unknown else ""
    text = (
        f"{n} of {known} patients with a known site come from a site that holds a single {what}{apart}: for them the "
        f"acquisition site alone predicts the {what}, so a high AUC may partly measure the scanner or institution "
        "rather than the tumour."
    )
    if pointer:
        text += " See the site table" + (f", and the mixed-grade {MIXED_COHORT} cohort on its own." if what == "grade"
                                         else ".")  # fmt: skip
    return text
