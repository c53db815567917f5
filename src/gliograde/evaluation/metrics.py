"""Classification metrics of one validation pass (positive class HGG = 1).

A rate whose denominator is empty is undefined, not zero: a fold or cohort without an LGG patient has no
specificity (NaN, "n/a" in the reports, null in JSON), and every figure built on it is NaN too (balanced accuracy,
macro F1/precision/recall, AUC), so that no row shows specificity 0 beside a balanced accuracy that silently dropped
the absent grade. Accuracy (correct / all) stays defined.

`METRICS` is the table of the reported metrics (name, table label, direction, format, where each appears): the
trainer's per-epoch history (`val_<name>`), the summary (per-fold table, mean ± SD, CSV), the reports, the per-epoch
plot panels and `validate` all read it. A metric added with `register_metric` brings its own `compute(labels, probs,
threshold) -> float` and then appears in all of them (MONAI's metrics, timm's registries are the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from gliograde import GRADES
from gliograde.errors import GliogradeError, unknown_name


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric. `compute(labels, probs, threshold) -> float` for an added one (a case is HGG when
    P(HGG) >= threshold; threshold a number or one per case); None for compute_metrics' own. `summarized`: in the
    per-fold tables, mean ± SD and CSV (else only in the per-epoch history); `panel`: the per-epoch plot panel that
    draws it ("validation", "per class"; None: none), under `plot_label` (default: the name)."""

    name: str
    label: str  # the column header of the tables
    higher_is_better: bool = True
    fmt: str = ".4f"
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray | float], float] | None = None
    summarized: bool = True
    panel: str | None = "validation"
    plot_label: str | None = None

    def format(self, value) -> str:
        """The value as the tables print it: `fmt`, "n/a" where undefined (None, NaN)."""
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, self.fmt)


# in the order of the tables (AUC first); the history records the same names as val_<name>
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("auc", "AUC"),
        MetricSpec("f1", "F1"),
        MetricSpec("accuracy", "Accuracy"),
        MetricSpec("sensitivity", "Sensitivity", panel="per class", plot_label="sensitivity (HGG)"),
        MetricSpec("specificity", "Specificity", panel="per class", plot_label="specificity (LGG)"),
        MetricSpec("balanced_accuracy", "Bal. acc."),
        MetricSpec("precision", "Precision", summarized=False, panel=None),
        MetricSpec("recall", "Recall", summarized=False, panel=None),
        MetricSpec("fn", "FN", higher_is_better=False, fmt="d", summarized=False, panel=None),
        MetricSpec("fp", "FP", higher_is_better=False, fmt="d", summarized=False, panel=None),
    )
}


class MetricError(GliogradeError):
    pass


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric to the table (after the built-in ones); it needs its own `compute`."""
    if spec.compute is None:
        raise MetricError(f"metric {spec.name!r}: an added metric needs compute(labels, probs, threshold) -> float")
    if spec.name in METRICS and METRICS[spec.name].compute is None:
        raise MetricError(f"metric {spec.name!r} is a built-in metric of compute_metrics; choose another name")
    METRICS[spec.name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    if name not in METRICS:
        raise MetricError(unknown_name("metric", name, METRICS, "metric"))
    return METRICS[name]


def monitored() -> list[str]:
    """The names the trainer records every epoch (val_<name>): all of them."""
    return list(METRICS)


def summarized() -> list[MetricSpec]:
    """The metrics of the per-fold tables, mean ± SD and CSV, in table order."""
    return [spec for spec in METRICS.values() if spec.summarized]


def summarized_names() -> list[str]:
    return [spec.name for spec in summarized()]


def added(m: dict) -> dict:
    """The values of the added (registered) metrics present in a metrics dict `m`, in table order: what a view that
    lists the built-in ones by hand appends."""
    return {name: m[name] for name, spec in METRICS.items() if spec.compute is not None and name in m}


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def compute_metrics(labels, probs, threshold=0.5, classes: tuple[str, str] = GRADES) -> dict:
    """Every metric the seeds report, from labels (0/1) and P(HGG); a case is HGG when P(HGG) >= threshold (one
    threshold, or one per case: each case's own fold's). Per class c: precision TP/(TP+FP), recall TP/(TP+FN), F1
    2TP/(2TP+FP+FN), each NaN where its denominator is empty, recall and F1 NaN where the class is absent; the macro
    figures are the mean over both grades (NaN when either is, or a grade is absent); balanced accuracy is
    (sensitivity + specificity)/2. `classes`: the names of labels 0 and 1 (per_class's keys, negative first): a
    cohort's own target names its classes (P(IDH wildtype)); HGG and LGG by default."""
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
        per_class[classes[c]] = {
            "precision": _ratio(hit, hit + wrong_in),
            "recall": _ratio(hit, support),
            "f1": _ratio(2 * hit, 2 * hit + wrong_in + missed) if support > 0 else math.nan,
            "support": support,
        }
    sens, spec = per_class[classes[1]]["recall"], per_class[classes[0]]["recall"]

    def macro(key: str) -> float:  # undefined where a grade is absent; else NaN propagates (precision 0/0)
        if any(per_class[g]["support"] == 0 for g in classes):
            return math.nan
        return float(np.mean([per_class[g][key] for g in classes]))

    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else math.nan
    out = {
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
    for name, metric in METRICS.items():  # the added metrics, computed by their own function
        if metric.compute is not None:
            out[name] = float(metric.compute(labels, probs, threshold))
    return out
