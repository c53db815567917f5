"""The README's first command: `gliograde demo` runs end to end and says where its outputs are."""

from __future__ import annotations

import json

import nibabel as nib

from gliograde.cli import main


def test_demo_end_to_end(tmp_path, caplog, capsys):
    out = tmp_path / "demo"
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    results = out / "results" / "ResNet10-3D"
    runs = sorted(results.glob("runs/fold_*/run_*"))
    assert [r.parent.name for r in runs] == [f"fold_{k}" for k in range(5)]
    for run in runs:
        assert json.loads((run / "metrics" / "metrics.json").read_text())["status"] == "complete"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["k"] == 5 and not summary["partial"] and summary["pooled"]["n"] == 60
    # it learned (chance is 0.5); the pooled AUC sits below the fold mean: each fold's scores are scaled differently
    assert summary["mean"]["auc"] >= 0.85 and summary["pooled"]["auc"] >= 0.75
    printed = capsys.readouterr().out
    assert "Mean ± std" in printed and "Pooled out-of-fold (60 patients)" in printed
    (pred_dir,) = (out / "predictions").iterdir()
    rows = (pred_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.startswith("Brats18_SYN") for r in rows[1:])
    new_ids = {p.name for p in (out / "new_cases").glob("*GG/*")}
    assert new_ids == {r.split(",")[0] for r in rows[1:]}
    assert not new_ids & set(json.loads((out / "cache" / "folds.json").read_text())["case_ids"])  # unseen cases
    for case in new_ids:
        saliency = nib.load(pred_dir / "saliency" / f"{case}_gradcam.nii.gz")
        flair = nib.load(next((out / "new_cases").glob(f"*GG/{case}/{case}_flair.nii.gz")))
        assert saliency.shape == flair.shape
    assert "demo finished" in caplog.text and str(results / "summary.md") in caplog.text
    # a second run reuses data, cache and every complete fold, and writes its predictions to a new folder
    metrics = (runs[0] / "metrics" / "metrics.json").read_bytes()
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    assert "reused" in caplog.text and "skipped" in caplog.text
    assert sorted(results.glob("runs/fold_*/run_*")) == runs
    assert (runs[0] / "metrics" / "metrics.json").read_bytes() == metrics
    assert len(list((out / "predictions").iterdir())) == 2
