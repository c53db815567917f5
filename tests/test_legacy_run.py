"""Runs written by an earlier gliograde stay readable: a results folder and its cache written by the code of commit
eee2c93 (tests/fixtures/legacy_run.tar.xz, made by tests/fixtures/make_legacy_run.py; NaN tokens in its
metrics.json, absolute cache paths of a machine that is gone) is evaluated, summarized, predicted with, validated
with and exported by today's code."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from gliograde.cli import main

ARCHIVE = Path(__file__).parent / "fixtures" / "legacy_run.tar.xz"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def new_cases(tmp_path_factory) -> Path:
    from gliograde.data.synthetic import synthesize

    out, _ = synthesize(tmp_path_factory.mktemp("new") / "data", 8, (32, 32, 24), seed=11, workers=1, progress=False,
                        first_index=100)  # fmt: skip
    return out


def runs_of(legacy: Path) -> list[Path]:
    return sorted((legacy / "results" / "ResNet10-3D" / "runs").glob("fold_*/run_*"))


def test_the_fixture_is_what_the_old_code_wrote(legacy):
    runs = runs_of(legacy)
    assert len(runs) == 2
    text = (runs[0] / "metrics" / "metrics.json").read_text()
    assert "NaN" in text  # the old records hold bare NaN tokens: they must still be read
    assert not Path(json.loads((runs[0] / "config" / "config.json").read_text())["config"]["cache_dir"]).exists()


def test_evaluate_rescores_an_old_run_on_its_moved_cache(legacy):
    from gliograde.evaluation.evaluate import evaluate_run

    run = runs_of(legacy)[0]
    stored = json.loads((run / "metrics" / "metrics.json").read_text(), parse_constant=float)["final"]
    result = evaluate_run(run, cache_dir=str(legacy / "cache" / "cache-s16"))
    assert result.metrics["auc"] == pytest.approx(stored["auc"], abs=1e-9)
    assert result.metrics["threshold"] == pytest.approx(stored["threshold"])
    json.loads((result.out_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_summarize_an_old_results_folder(legacy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = legacy / "results" / "ResNet10-3D"
    assert main(["summarize", "--results", str(results)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert len(summary["folds"]) == 2


def test_predict_and_validate_with_an_old_ensemble(legacy, new_cases, tmp_path):
    results = legacy / "results" / "ResNet10-3D"
    out = tmp_path / "pred"
    assert main(["predict", "--runs", str(results), "--data-root", str(new_cases), "--out", str(out)]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 8
    val = tmp_path / "val"
    assert main(["validate", "--runs", str(results), "--data-root", str(new_cases), "--out", str(val)]) == 0
    record = json.loads((val / "validation.json").read_text())
    assert record["metrics"]["n"] == 8 and record["metrics"]["auc"] == pytest.approx(0.5)  # zero weights: chance


def test_export_an_old_run_to_onnx(legacy, tmp_path):
    pytest.importorskip("onnx")
    from gliograde.export import export

    files = export(runs_of(legacy)[0], tmp_path / "onnx")
    assert files and all(f.is_file() and f.with_suffix(".json").is_file() for f in files)
