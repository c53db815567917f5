"""The 2D MIL model as a first-class model family: the same folds, protocol, run folder, evaluate and predict as the
3D model (the seeds' "Differences from MIL Training")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gliograde.config import resolve
from gliograde.data.brats import discover_cases
from gliograde.data.cache import open_cache, prepare_cache
from gliograde.data.synthetic import synthesize
from gliograde.errors import GliogradeError
from gliograde.evaluation.evaluate import evaluate_run
from gliograde.inference.predict import PredictError, load_ensemble, output_dir, predict_cases
from gliograde.training.cv import run_cv


@pytest.fixture(scope="module")
def mil_cv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mil")
    data, _ = synthesize(tmp / "data", 60, (64, 64, 48), seed=42, workers=2, progress=False)
    cache = open_cache(prepare_cache(data, tmp / "cache", size=32, workers=2, progress=False).path)
    cfg = resolve("cpu-demo", model="mil2d", depth=18, mil_k=8, cache_dir=str(cache.path), folds=3, epochs=10,
                  min_epochs=10, output_dir=str(tmp / "results"), plots_every=0)  # fmt: skip
    return data, cache, cfg, run_cv(cfg)


def test_a_tiny_mil_cv_learns_under_the_default_protocol(mil_cv):
    _, cache, _, report = mil_cv
    pooled = report["pooled"]
    assert report["protocol"] == "inner" and pooled["n"] == len(cache.ids)
    assert pooled["auc_delong"]["ci_low"] > 0.6, pooled["auc_delong"]  # well above chance
    assert report["configuration"]["model"] == "mil2d"
    for row in report["folds"]:
        config = json.loads((Path(row["run"]) / "config" / "config.json").read_text())
        assert config["config"]["model"] == "mil2d"


def test_mil_runs_save_each_cases_slices_and_attention(mil_cv):
    _, _, _, report = mil_cv
    run = Path(report["folds"][0]["run"])
    slices, weights = (
        np.load(run / "predictions" / "val_slices.npy"),
        np.load(run / "predictions" / "val_attention.npy"),
    )
    n = len(json.loads((run / "predictions" / "val_ids.json").read_text()))
    assert slices.shape == weights.shape == (n, 8)
    np.testing.assert_allclose(weights.sum(1), 1, atol=1e-5)
    assert (weights >= 0).all() and (np.diff(slices, axis=1) > 0).all()  # distinct slices, in order


def test_evaluate_and_predict_work_on_a_mil_run(mil_cv, tmp_path):
    data, _, cfg, report = mil_cv
    run = Path(report["folds"][1]["run"])
    again = evaluate_run(run).metrics
    stored = json.loads((run / "metrics" / "metrics.json").read_text())["final"]
    assert again["auc"] == pytest.approx(stored["auc"], abs=1e-9) and again["threshold"] == stored["threshold"]
    with pytest.raises(GliogradeError, match="records its slice attention instead"):
        evaluate_run(run, attention=True)
    members = load_ensemble([cfg.output_dir])
    cases = discover_cases(data).cases[:2]
    records = predict_cases(cases, members, output_dir(tmp_path / "pred"), saliency=True)
    for r in records:
        assert len(r["mil"]["slices"]) == 8 and sum(r["mil"]["attention"]) == pytest.approx(1, abs=1e-5)
        assert Path(r["saliency"]["png"]).stat().st_size > 2000  # the strip of the most-attended slices


def test_a_3d_and_a_mil_checkpoint_are_not_ensembled(mil_cv, cv_run):
    report = mil_cv[3]
    report3d = cv_run[2]
    with pytest.raises(PredictError, match="model kind"):
        load_ensemble([report["folds"][0]["run"], report3d["folds"][0]["run"]])
