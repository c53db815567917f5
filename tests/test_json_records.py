"""Every JSON file gliograde writes is strict JSON (an undefined figure is null, never a bare NaN token, which jq,
JavaScript and most parsers refuse), and the readers that do arithmetic take null, and the NaN tokens of files
written before this rule, back as NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gliograde.files import number, write_json


def strict_load(path: Path):
    """json.loads that refuses NaN / Infinity tokens, as a strict parser does."""

    def refuse(token):
        raise ValueError(f"{path}: bare {token} token (not JSON)")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_write_json_writes_null_for_every_non_finite_figure(tmp_path):
    path = tmp_path / "r.json"
    record = {"auc": math.nan, "history": [{"val_auc": np.float32("nan"), "loss": math.inf}], "n": np.int64(3)}
    write_json(path, {**record, "bins": np.array([0.5, np.nan]), "ok": 0.25, "absent": None})
    assert strict_load(path) == {
        "auc": None,
        "history": [{"val_auc": None, "loss": None}],
        "n": 3,
        "bins": [0.5, None],
        "ok": 0.25,
        "absent": None,
    }
    with pytest.raises(ValueError, match="strict JSON only"):
        write_json(path, record, strict=False)
    assert number(None) != number(None) and number(0.25) == 0.25 and math.isnan(number(math.nan))


def test_a_cross_validation_writes_strict_json_only(cv_run):
    """metrics.json held 26 bare NaN tokens in one run (empty reliability bins, undefined metrics)."""
    cache, cfg, _ = cv_run
    files = sorted(Path(cfg.output_dir).rglob("*.json")) + sorted(Path(cache.path).rglob("*.json"))
    names = {p.name for p in files}
    assert {"metrics.json", "config.json", "val_ids.json", "summary.json", "folds.json", "manifest.json"} <= names
    for path in files:
        strict_load(path)
    final = strict_load(next(Path(cfg.output_dir).glob("runs/fold_0/run_*/metrics/metrics.json")))["final"]
    frac_pos = final["calibration"]["reliability"]["frac_pos"]
    assert None in frac_pos  # an empty bin of the reliability curve: null, where it used to be NaN


def _evaluation(run_dir: Path, text: str) -> None:
    (run_dir / "evaluation_20260101_000000").mkdir(parents=True)
    (run_dir / "evaluation_20260101_000000" / "metrics.json").write_text(text)


def test_the_summary_reads_attention_figures_from_old_nan_and_new_null_files(tmp_path):
    from gliograde.evaluation.summary import attention_of
    from gliograde.runs import FoldRun

    runs = []
    for fold, mass in ((0, "NaN"), (1, "null"), (2, "0.5")):  # an old file, a strict one, a defined figure
        run = FoldRun(fold, tmp_path / f"run{fold}", {}, 3, [], np.zeros(0), np.zeros(0))
        figures = f'"n": {2 if fold == 2 else 0}, "mean_mass_in_mask": {mass}, "mean_chance": 0.1, '
        figures += f'"pointing_game_accuracy": {mass}'
        _evaluation(run.run_dir, '{"final": {"auc": NaN, "attention": {' + figures + "}}}")
        runs.append(run)
    rows = [{"fold": f} for f in range(3)]
    found = attention_of(runs, rows)
    assert math.isnan(rows[0]["attention_mass"]) and math.isnan(rows[1]["attention_mass"])
    assert rows[2]["attention_mass"] == 0.5 and rows[1]["attention_chance"] == 0.1
    assert found["pooled"]["n"] == 2 and math.isnan(found["pooled"]["mean_mass_in_mask"])  # NaN x 0 cases: NaN
    assert found["pooled"]["mean_chance"] == pytest.approx(0.1)


@pytest.mark.parametrize("auc", ["NaN", "null"])
def test_a_launcher_task_reads_an_undefined_auc_of_a_complete_fold_as_nan(tmp_path, monkeypatch, auc):
    from gliograde.config import resolve
    from gliograde.training import cv, launcher

    run = tmp_path / "run_20260101_000000"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "metrics.json").write_text(f'{{"status": "complete", "final": {{"auc": {auc}}}}}')
    monkeypatch.setattr(cv, "fold_plan", lambda cfg: ("done", run))
    values = resolve("cpu-demo", output_dir=str(tmp_path)).to_dict()
    repeat, fold, run_dir, got = launcher.run_fold_task(values)
    assert (repeat, fold, run_dir) == (0, 0, str(run)) and math.isnan(got)
