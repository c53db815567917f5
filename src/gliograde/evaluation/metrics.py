"""Classification metrics of one validation pass (positive class HGG = 1), scikit-learn based."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from gliograde import GRADES


def compute_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Every metric the seeds report, from labels (0/1) and P(HGG). AUC is NaN when one class is absent."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(np.int64)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)
    tn, fp, fn, tp = confusion_matrix(labels, preds, labels=[0, 1]).ravel()
    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else math.nan
    return {
        "auc": float(auc),
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(p.mean()),
        "recall": float(r.mean()),
        "f1": float(f.mean()),
        # mean recall over the classes present (scikit-learn's definition, without its warning for one class)
        "balanced_accuracy": float(np.mean([r[c] for c in (0, 1) if s[c] > 0])) if len(labels) else math.nan,
        "sensitivity": float(r[1]),  # recall of HGG
        "specificity": float(r[0]),  # recall of LGG
        "per_class": {
            GRADES[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c])}
            for c in (0, 1)
        },
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "tp": int(tp),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "n": len(labels),
    }
