"""What both predictors (PyTorch `predict` and the torch-free ONNX one) write and print: predictions.csv and the
one-line decision per case."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from gliograde import GRADES
from gliograde.files import write_text_atomic


def write_predictions_csv(out: Path, records: list[dict], names: list[str]) -> None:
    """case, P(HGG), the ensemble threshold it is compared with, predicted grade, true grade, then each ensemble
    member's P(HGG); then the input-quality flags (space-separated) where the records carry them."""
    buf = io.StringIO()
    w = csv.writer(buf)
    qc = any("qc" in r for r in records)
    classes = positive_of(records[0]) if records else None  # a cohort's own target: its class named on each row
    head = ["case", "p_hgg", "threshold", "predicted_grade", "true_grade"]
    if classes is not None:
        head = ["case", "p_positive", "threshold", "predicted_class", "true_class", "positive_class"]
    w.writerow([*head, *names, *["qc_flags"] * qc])
    for r in records:
        flags = [" ".join((r.get("qc") or {}).get("flags") or [])] * qc
        named = [classes] if classes is not None else []
        w.writerow([r["case"], f"{r['p_hgg']:.6f}", f"{r['threshold']:.6f}", r["predicted_grade"],
                    r["true_grade"] or "", *named, *r["folds"].values(), *flags])  # fmt: skip
    write_text_atomic(Path(out) / "predictions.csv", buf.getvalue())


def positive_of(record: dict) -> str | None:
    """The positive class of a record's target where it is not the seeds' HGG (None: HGG vs LGG)."""
    classes = record.get("classes") or GRADES
    return None if tuple(classes) == GRADES else classes[1]


def decision_text(record: dict, brief: bool = False) -> str:
    """One case's decision as a person reads it, the threshold beside it: "case: P(HGG) = 0.8320 < threshold 0.8512
    -> LGG". The threshold is the ensemble's (the mean of the folds' fitted thresholds), rarely 0.5. Then, where the
    record has them: the true grade, the input-quality flags, and (unless `brief`, as in a figure's title) the folds'
    probabilities and an out-of-distribution check that could not judge."""
    p, t = float(record["p_hgg"]), float(record["threshold"])
    folds = record.get("folds") or {}
    each = " (folds " + ", ".join(f"{v:.3f}" for v in folds.values()) + ")" if len(folds) > 1 and not brief else ""
    side = ">=" if p >= t else "<"
    pos = positive_of(record)
    decided = record["predicted_grade"]
    text = f"{record['case']}: P({pos or 'HGG'}) = {p:.4f} {side} threshold {t:.4f} -> {decided}{each}"
    if record.get("true_grade"):
        text += f"; true {'class' if pos else 'grade'} {record['true_grade']}"
    qc = record.get("qc") or {}
    if qc.get("flags"):
        text += f"; flags: {', '.join(qc['flags'])}"
    verdict = (qc.get("ood") or {}).get("verdict", "")
    if verdict.startswith("not enough") and not brief:
        text += f"; out of distribution? {verdict}"
    return text
