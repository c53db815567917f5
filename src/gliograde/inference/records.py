"""The prediction files both predictors write (PyTorch `predict` and the torch-free ONNX one): predictions.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from gliograde.files import write_text_atomic


def write_predictions_csv(out: Path, records: list[dict], names: list[str]) -> None:
    """case, P(HGG), predicted grade, true grade, then each ensemble member's P(HGG); then the input-quality flags
    (space-separated) where the records carry them."""
    buf = io.StringIO()
    w = csv.writer(buf)
    qc = any("qc" in r for r in records)
    w.writerow(["case", "p_hgg", "predicted_grade", "true_grade", *names, *["qc_flags"] * qc])
    for r in records:
        flags = [" ".join((r.get("qc") or {}).get("flags") or [])] * qc
        w.writerow([r["case"], f"{r['p_hgg']:.6f}", r["predicted_grade"], r["true_grade"] or "", *r["folds"].values(),
                    *flags])  # fmt: skip
    write_text_atomic(Path(out) / "predictions.csv", buf.getvalue())
