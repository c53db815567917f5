"""Classification metrics of one validation pass (positive class HGG = 1).

A rate whose denominator is empty is undefined, not zero: a fold or cohort without an LGG patient has no
specificity (NaN, "n/a" in the reports, null in JSON), and every figure built on it is NaN too (balanced accuracy,
macro F1/precision/recall, AUC), so that no row shows specificity 0 beside a balanced accuracy that silently dropped
the absent grade. Accuracy (correct / all) stays defined.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from gliograde import GRADES


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def compute_metrics(labels, probs, threshold=0.5) -> dict:
    """Every metric the seeds report, from labels (0/1) and P(HGG); a case is HGG when P(HGG) >= threshold (one
    threshold, or one per case: each case's own fold's). Per class c: precision TP/(TP+FP), recall TP/(TP+FN), F1
    2TP/(2TP+FP+FN), each NaN where its denominator is empty, recall and F1 NaN where the class is absent; the macro
    figures are the mean over both grades (NaN when either is, or a grade is absent); balanced accuracy is
    (sensitivity + specificity)/2."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= np.asarray(threshold, dtype=np.float64)).astype(np.int64)
    tp = int(np.sum((preds == 1) & (labels == 1)))
    tn = int(np.sum((preds == 0) & (labels == 0)))
    fp = int(np.sum((preds == 1) & (labels == 0)))
    fn = int(np.sum((preds == 0) & (labels == 1)))
    per_class = {}
    for c, (hit, wrong_in, missed) in {0: (tn, fn, fp), 1: (tp, fp, fn)}.items():
        support = hit + missed
        per_class[GRADES[c]] = {
            "precision": _ratio(hit, hit + wrong_in),
            "recall": _ratio(hit, support),
            "f1": _ratio(2 * hit, 2 * hit + wrong_in + missed) if support > 0 else math.nan,
            "support": support,
        }
    sens, spec = per_class[GRADES[1]]["recall"], per_class[GRADES[0]]["recall"]

    def macro(key: str) -> float:  # undefined where a grade is absent; else NaN propagates (precision 0/0)
        if any(per_class[g]["support"] == 0 for g in GRADES):
            return math.nan
        return float(np.mean([per_class[g][key] for g in GRADES]))

    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else math.nan
    return {
        "auc": float(auc),
        "accuracy": _ratio(tp + tn, len(labels)),
        "precision": macro("precision"),
        "recall": macro("recall"),
        "f1": macro("f1"),
        "balanced_accuracy": (sens + spec) / 2,  # NaN when a grade is absent, as sensitivity or specificity is
        "sensitivity": sens,  # recall of HGG
        "specificity": spec,  # recall of LGG
        "per_class": per_class,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "n": len(labels),
    }
