"""The README's first command: `gliograde demo` runs end to end and says where its outputs are."""

from __future__ import annotations

import json

from gliograde.cli import main


def test_demo_end_to_end(tmp_path, caplog):
    out = tmp_path / "demo"
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    run = next((out / "results" / "ResNet10-3D" / "runs" / "fold_0").iterdir())
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["final"]["auc"] >= 0.8
    assert (out / "cache" / "folds.json").is_file() and (out / "data" / "HGG").is_dir()
    assert "demo finished" in caplog.text and str(run) in caplog.text
    # a second run reuses the data and the cache, and starts a new run folder without touching the first
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    assert "reused" in caplog.text and len(list(run.parent.iterdir())) == 2
    assert json.loads((run / "metrics" / "metrics.json").read_text()) == metrics
