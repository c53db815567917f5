"""Cross-validation: the summary's arithmetic and run selection, cv's resumption, and the standalone evaluate."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_run
from sklearn.metrics import roc_auc_score

from gliograde.checkpoints import CheckpointError
from gliograde.cli import main
from gliograde.data.brats import site_of
from gliograde.evaluation.evaluate import evaluate_run
from gliograde.evaluation.site_baseline import site_audit, site_warning
from gliograde.evaluation.stats import mean_std
from gliograde.evaluation.summary import summarize
from gliograde.files import number
from gliograde.runs import SummaryError, find_runs
from gliograde.training.cv import fold_plan, run_cv
from gliograde.training.trainer import train_fold


def fake_cv(results, k=3, n=20, seed=0, skip=()):
    rng = np.random.default_rng(seed)
    folds = []
    for f in range(k):
        if f in skip:
            continue
        labels = np.array([0] * 5 + [1] * (n - 5))
        probs = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
        ids = [f"Brats18_TCIA0{f}_{i:03d}_1" for i in range(n)]
        folds.append((fake_run(results, f, k, ids, labels, probs), labels, probs))
    return folds


# ------------------------------------------------------------------------------------------------ arithmetic
def test_summary_reports_mean_sample_std_and_pooled_auc(tmp_path):
    folds = fake_cv(tmp_path, k=3)
    report = summarize(tmp_path)
    aucs = [roc_auc_score(labels, probs) for _, labels, probs in folds]
    assert report["mean"]["auc"] == pytest.approx(np.mean(aucs))
    assert report["std"]["auc"] == pytest.approx(np.std(aucs, ddof=1))
    pooled_labels = np.concatenate([f[1] for f in folds])
    pooled_probs = np.concatenate([f[2] for f in folds])
    assert report["pooled"]["auc"] == pytest.approx(roc_auc_score(pooled_labels, pooled_probs))
    lo, hi = report["pooled"]["auc_ci95"]
    assert lo <= report["pooled"]["auc"] <= hi
    assert [r["fold"] for r in report["folds"]] == [0, 1, 2] and not report["partial"]
    p = report["pooled"]
    d = p["auc_delong"]
    assert d["auc"] == pytest.approx(p["auc"]) and d["ci_low"] < p["auc"] < d["ci_high"]
    sens = p["rates"]["sensitivity"]
    assert sens["value"] == pytest.approx(p["sensitivity"]) and sens["ci_low"] < sens["value"] < sens["ci_high"]
    brier = float(np.mean((pooled_probs - pooled_labels) ** 2))
    assert p["calibration"]["brier"] == pytest.approx(brier) and 0 <= p["calibration"]["ece"] <= 1
    assert "optimistic" in p["sensitivity_at_specificity"]["protocol"]
    assert set(report["mean"]) == {"auc", "f1", "accuracy", "sensitivity", "specificity", "balanced_accuracy"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"folds", "mean", "std", "pooled"} <= set(saved)
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("fold,best_epoch") and csv_rows[-2].startswith("mean") and len(csv_rows) == 6
    md = (tmp_path / "summary.md").read_text()
    assert "Mean ± std" in md and "Pooled out-of-fold" in md
    assert "Wilson" in md and "DeLong" in md and "ECE" in md
    for png in ("cv_roc_curves.png", "cv_pr_curves.png", "cv_reliability.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_runs_of_different_protocols_or_splits_are_not_pooled(tmp_path):
    folds = fake_cv(tmp_path, k=3)
    config = folds[1][0] / "config" / "config.json"
    config.write_text(json.dumps({"config": {"fold": 1, "folds": 3, "split_seed": 7}}))
    with pytest.raises(SummaryError, match="different splits"):
        summarize(tmp_path)
    assert any(w.startswith("MIXED splits") for w in summarize(tmp_path, allow_partial=True)["warnings"])
    config.write_text(json.dumps({"config": {"fold": 1, "folds": 3}}))
    metrics = folds[2][0] / "metrics" / "metrics.json"
    m = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**m, "selection": {"protocol": "inner"}}))
    with pytest.raises(SummaryError, match="mix selection protocols"):
        summarize(tmp_path)
    metrics.write_text(json.dumps(m))
    report = summarize(tmp_path)  # the fake runs record no protocol: the seeds' outer, labelled optimistic
    assert report["protocol"] == "outer" and any("optimistic" in w for w in report["warnings"])


def test_the_seed_table_gives_the_seed_mean_and_std():
    mean, std = mean_std([0.8079, 0.9016, 0.8952, 0.9206, 0.8714])  # training_journey_summary.md, Table 1
    assert (round(mean, 4), round(std, 4)) == (0.8793, 0.0436)  # the seed prints 0.8794 (rounding of its inputs)
    assert math.isnan(mean_std([0.9])[1])


def test_the_newest_complete_run_of_each_fold_is_chosen(tmp_path):
    fake_cv(tmp_path, k=2)
    labels, probs = np.array([0, 0, 1, 1] * 5), np.linspace(0, 1, 20)
    ids = [f"Brats18_TCIA00_{i:03d}_1" for i in range(20)]
    newer = fake_run(tmp_path, 0, 2, ids, labels, probs, stamp="20260101_000000_2")
    fake_run(tmp_path, 0, 2, ids, labels, probs, stamp="20260102_000000", status="running")
    runs, problems = find_runs(tmp_path)
    assert runs[(0, 0)].run_dir == newer and not problems  # keyed by (repeat, fold)


def test_a_partial_cv_is_refused_unless_allowed_and_then_labelled(tmp_path):
    fake_cv(tmp_path, k=3, skip=(2,))
    fake_run(tmp_path, 2, 3, ["x"], [1], [0.5], status="running")
    with pytest.raises(SummaryError, match=r"fold 2 \(run_20260101_000000: running or interrupted\)"):
        summarize(tmp_path)
    report = summarize(tmp_path, allow_partial=True)
    assert report["partial"] and report["missing_folds"] == [2]
    assert report["warnings"][0].startswith("PARTIAL")
    assert "(PARTIAL)" in (tmp_path / "summary.md").read_text()
    assert main(["summarize", "--results", str(tmp_path)]) == 2


# ------------------------------------------------------------------------------------------------ site audit
def test_site_audit_on_the_real_sample_ids(sample_root):
    from conftest import SAMPLE_HGG, SAMPLE_LGG

    ids = SAMPLE_HGG + SAMPLE_LGG
    labels = [1] * len(SAMPLE_HGG) + [0] * len(SAMPLE_LGG)
    audit = site_audit(ids, labels, preds=labels)
    assert set(audit["sites"]) == {"2013", "CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA10", "TCIA13"}
    assert audit["sites"]["TCIA10"] == {"cases": 3, "HGG": 0, "LGG": 3, "single_grade": True, "accuracy": 1.0}
    assert audit["patients_in_single_grade_sites"] == 9  # one case per site is single-grade by construction


def test_site_audit_of_brats_2018_finds_the_site_confound(sample_root):
    import csv

    with (sample_root / "name_mapping_brats2019.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["BraTS_2018_subject_ID"] not in ("", "NA")]
    ids = [r["BraTS_2018_subject_ID"] for r in rows]
    labels = [int(r["Grade"] == "HGG") for r in rows]
    audit = site_audit(ids, labels)
    assert len(ids) == 285 and audit["patients_in_single_grade_sites"] == 255
    assert not audit["sites"]["2013"]["single_grade"]
    assert "255 of 285 patients" in site_warning(audit)
    assert site_of("Brats18_2013_10_1") == "2013"


# ---------------------------------------------------------------------------------------------- cv, evaluate
def test_cv_trains_every_fold_and_summarizes(cv_run):
    cache, cfg, report = cv_run
    assert report["k"] == 3 and not report["partial"] and len(report["folds"]) == 3
    for row in report["folds"]:
        metrics = json.loads((Path(row["run"]) / "metrics" / "metrics.json").read_text())
        assert number(metrics["final"]["auc"]) == pytest.approx(row["auc"], nan_ok=True)  # strict JSON: NaN is null
        plots = {p.name for p in (Path(row["run"]) / "plots").iterdir()}  # --plots-every 0: the final plots only
        assert {"roc_curve.png", "learning_curves.png"} <= plots and not any("_epoch_" in name for name in plots)
    assert report["pooled"]["n"] == len(cache.ids)
    assert (Path(cfg.output_dir) / "summary.md").is_file()


def test_cv_skips_complete_folds_and_resumes_an_interrupted_one(cv_run):
    _, cfg, report = cv_run
    runs_before = sorted(Path(cfg.output_dir).glob("runs/fold_*/run_*"))
    again = run_cv(cfg, [0, 1, 2])
    assert [r["run"] for r in again["folds"]] == [r["run"] for r in report["folds"]]
    assert sorted(Path(cfg.output_dir).glob("runs/fold_*/run_*")) == runs_before

    def stop(epoch, run_dir):
        raise KeyboardInterrupt

    fold0 = dataclasses.replace(cfg, fold=0)
    with pytest.raises(KeyboardInterrupt):
        train_fold(fold0, on_epoch_end=stop)
    state, run = fold_plan(fold0)
    assert state == "resume"
    resumed = run_cv(cfg, [0, 1, 2])
    assert resumed["folds"][0]["run"] == str(run)
    assert json.loads((run / "metrics" / "metrics.json").read_text())["status"] == "complete"
    assert fold_plan(dataclasses.replace(fold0, lr=0.5))[0] == "new"  # another configuration is not resumed


def test_evaluate_rescoring_matches_the_stored_auc_and_overwrites_nothing(cv_run):
    _, _, report = cv_run
    run = Path(report["folds"][1]["run"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = evaluate_run(run)
    stored = json.loads((run / "metrics" / "metrics.json").read_text())["final"]
    assert result.metrics["auc"] == pytest.approx(number(stored["auc"]), abs=1e-9, nan_ok=True)
    assert result.metrics["checkpoint"] == "best.pt" and result.metrics["auc_difference"] < 1e-9
    # the run's operating point (fitted on its selection part) applied unchanged: the same decisions
    assert result.metrics["threshold"] == stored["threshold"] and result.metrics["f1"] == pytest.approx(stored["f1"])
    assert result.metrics["operating_point"] == stored["operating_point"]
    assert result.out_dir.parent == run and result.out_dir.name.startswith("evaluation_")
    for name in ("metrics.json", "val_probs.npy", "val_ids.json", "roc_curve.png", "confusion_matrix.png"):
        assert (result.out_dir / name).is_file()
    assert {p: p.read_bytes() for p in before} == before
    second = evaluate_run(run)
    assert second.out_dir != result.out_dir
    with pytest.raises(CheckpointError, match=r"best_ema\.pt does not exist"):
        evaluate_run(run, "best_ema")


def test_evaluate_rechecks_the_stored_auc_on_the_selection_part_like_with_like(cv_run, caplog):
    """Under inner selection a checkpoint's stored AUC is the selection part's; comparing it with the reported fold's
    raised a false alarm whenever the two differ, which is the usual case."""
    _, _, report = cv_run
    runs = [Path(f["run"]) for f in report["folds"]]
    finals = [json.loads((r / "metrics" / "metrics.json").read_text())["final"] for r in runs]
    gaps = [abs(number(f["auc"]) - number(f["checkpoint_auc"])) for f in finals]
    differ = [r for r, gap in zip(runs, gaps, strict=True) if gap > 0.01]
    assert differ, "the fixture should hold a fold whose selection-part AUC differs from its reported AUC"
    with caplog.at_level("WARNING", logger="gliograde"):
        result = evaluate_run(differ[0])
    assert "differs from the checkpoint's stored AUC" not in caplog.text
    assert result.metrics["recheck_auc"] == pytest.approx(result.metrics["checkpoint_auc"], abs=0.01)
    assert result.metrics["auc_difference"] < 1e-9  # the reported fold is compared with the reported AUC


def test_evaluate_and_cv_command_lines(cv_run, capsys):
    import subprocess
    import sys

    from conftest import REPO

    _, _, report = cv_run
    run = report["folds"][0]["run"]
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluation/evaluate_fold.py"), "--run", run, "--checkpoint", "last"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "invalid choice: 'last'" in out.stderr
    assert main(["evaluate", "--run", run]) == 0
    assert main(["cv", "--preset", "cpu-demo", "--only", "0-7", "--dry-run"]) == 2
    assert "outside 0..4" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_folds_train_in_separate_processes_from_one_prepared_cache(synth_root, tmp_path):
    from gliograde.config import resolve

    cfg = resolve(
        "cpu-demo",
        data_root=str(synth_root),
        cache_dir=str(tmp_path / "caches"),
        output_dir=str(tmp_path / "res"),
        size=16,
        folds=2,
        epochs=1,
        min_epochs=1,
        batch_size=4,
        num_workers=0,
    )
    report = run_cv(cfg, [0, 1], parallel=2)
    assert [r["fold"] for r in report["folds"]] == [0, 1] and not report["partial"]
    assert [p.name for p in (tmp_path / "caches").iterdir()] == ["data-s16"]  # prepared once, by the parent


def test_fold_lists_parse_and_bad_ones_are_explained():
    from gliograde.config import ConfigError, parse_fold_list

    assert parse_fold_list(None, 5) == [0, 1, 2, 3, 4]
    assert parse_fold_list("0-4", 5) == [0, 1, 2, 3, 4]
    assert parse_fold_list("3,1-2,1", 5) == [1, 2, 3]
    for bad, why in (("2-1", "ranges low-high"), ("a", "give folds like"), ("0-7", r"\[5, 6, 7\] are outside")):
        with pytest.raises(ConfigError, match=why):
            parse_fold_list(bad, 5)


def test_evaluate_refuses_a_run_whose_folds_have_changed(cv_run, tmp_path):
    import shutil

    from gliograde.evaluation.evaluate import EvaluationError

    _, _, report = cv_run
    run = tmp_path / "run_copy"
    shutil.copytree(report["folds"][2]["run"], run)
    ids = json.loads((run / "predictions" / "val_ids.json").read_text())
    (run / "predictions" / "val_ids.json").write_text(json.dumps([*ids[1:], "Brats18_SYNA_9999_1"]))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(EvaluationError, match="the folds changed since training"):
        evaluate_run(run)
    assert sorted(p.name for p in run.iterdir()) == before  # no evaluation folder left behind


def test_parallel_folds_map_gpus_through_the_parents_visible_list():
    from gliograde.training.cv import physical_gpus

    assert physical_gpus(2, "2,5") == ["2", "5"]  # this process's GPU 1 is the physical GPU 5
    assert physical_gpus(2, None) == ["0", "1"]
    assert physical_gpus(1, "GPU-uuid-a, GPU-uuid-b") == ["GPU-uuid-a"]
    assert physical_gpus(0, "") == []


@pytest.mark.parametrize(
    "error, expected",
    [
        (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "--batch-size 4"),
        (lambda: RuntimeError("an unexpected bug"), "RuntimeError: an unexpected bug"),
    ],
)
def test_a_fold_that_fails_in_its_process_is_named_and_reported_not_raised(monkeypatch, error, expected):
    import queue

    from gliograde.config import resolve
    from gliograde.training import cv, trainer

    def boom(cfg, **_):
        raise error()

    monkeypatch.setattr(trainer, "train_fold", boom)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the child's core share, not this process's
    results = queue.Queue()
    values = resolve("final", fold=3, batch_size=4).to_dict()
    cv._train_child(values, None, 1, logging.WARNING, results)
    key, run_dir, detail = results.get_nowait()
    assert (key, run_dir) == ((0, 3), None)
    assert expected in detail
    if "batch-size" in expected:
        assert "--gradient-accumulation-steps" in detail and "memory" in detail


def test_evaluate_measures_where_the_model_looks_and_the_summary_reports_it(cv_run, capsys):
    _, cfg, _ = cv_run
    current = find_runs(Path(cfg.output_dir))[0][(0, 0)]  # fold 0's newest complete run (other tests add runs)
    run = current.run_dir
    assert main(["evaluate", "--run", str(run), "--attention", "--saliency-layer", "layer3"]) == 0
    ev = max(run.glob("evaluation_*"), key=lambda p: p.name)
    attention = json.loads((ev / "metrics.json").read_text())["final"]["attention"]
    per_case = json.loads((ev / "attention.json").read_text())["per_case"]
    assert attention["layer"] == "layer3" and attention["n"] == len(per_case) == len(current.ids)
    for case in per_case:  # null: an all-zero map (a 1^3 Grad-CAM grid at 16^3 can vanish), no mass to place
        assert case["mass_in_mask"] is None or 0 <= case["mass_in_mask"] <= 1
        assert 0 < case["chance"] < 1 and case["pointing_hit"] in (True, False)
    mass = [number(c["mass_in_mask"]) for c in per_case]
    assert number(attention["mean_mass_in_mask"]) == pytest.approx(np.nanmean(mass), nan_ok=True)
    summary = summarize(cfg.output_dir)
    assert summary["attention"]["pooled"]["n"] == attention["n"] and summary["attention"]["pooled"][
        "folds_checked"
    ] == [0]
    assert summary["folds"][0]["attention_mass"] == pytest.approx(number(attention["mean_mass_in_mask"]), nan_ok=True)
    assert "Where the model looks" in (Path(cfg.output_dir) / "summary.md").read_text()


def test_folds_recorded_before_a_field_existed_are_one_configuration_with_new_ones(tmp_path):
    """Folds 0-1 written before the cohort and fine-tuning fields, fold 2 after (at their defaults): one CV."""
    from gliograde.config import IMPLIED_BEFORE_ADDED

    folds = fake_cv(tmp_path, k=3)
    config = folds[2][0] / "config" / "config.json"
    config.write_text(json.dumps({"config": {"fold": 2, "folds": 3, **IMPLIED_BEFORE_ADDED}}))
    assert not any(w.startswith("MIXED") for w in summarize(tmp_path)["warnings"])
    config.write_text(json.dumps({"config": {"fold": 2, "folds": 3, **IMPLIED_BEFORE_ADDED, "probe": True}}))
    with pytest.raises(SummaryError, match=r"configurations \(probe: fold 0=false, fold 1=false, fold 2=true"):
        summarize(tmp_path)


def test_folds_of_different_configurations_are_refused_unless_allowed(tmp_path):
    folds = fake_cv(tmp_path, k=3)
    config = folds[1][0] / "config" / "config.json"
    config.write_text(json.dumps({"config": {"fold": 1, "folds": 3, "lr": 0.5}}))
    with pytest.raises(SummaryError, match=r"different configurations \(lr: fold 0=\"<absent>\", fold 1=0.5"):
        summarize(tmp_path)
    report = summarize(tmp_path, allow_mixed=True)
    assert any(w.startswith("MIXED configurations") for w in report["warnings"])
    assert "lr" not in report["configuration"] and report["configuration"]["folds"] == 3


def test_a_cv_records_its_provenance(cv_run):
    cache, cfg, report = cv_run
    run = Path(report["folds"][0]["run"])
    record = json.loads((run / "config" / "config.json").read_text())
    prov = record["provenance"]
    from gliograde.provenance import sha256_file, sha256_json

    assert prov["cache_fingerprint"] == sha256_file(cache.path / "manifest.json")
    assert prov["folds_sha256"] == sha256_json(json.loads((cache.path / "folds.json").read_text()))
    assert prov["pretrained_sha256"] is None  # cpu-demo trains from scratch
    assert {"git_commit", "git_dirty", "cuda", "cudnn", "nccl", "precision"} <= set(record["environment"])
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["provenance"]["shared"]["cache_fingerprint"] == prov["cache_fingerprint"]
    assert summary["configuration"]["depth"] == 10 and "fold" not in summary["configuration"]


def test_compare_and_the_html_report_from_the_command_line(cv_run, tmp_path, capsys):
    _, cfg, _ = cv_run
    assert main(["summarize", "--results", cfg.output_dir, "--bootstrap", "200"]) == 0
    html = (Path(cfg.output_dir) / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "http" not in html.split("<body")[1][:200]
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", cfg.output_dir, cfg.output_dir, "--out", str(out), "--bootstrap", "200"]) == 0
    assert "no evidence of a difference" in capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    assert saved["pairs"][0]["delong"]["delta"] == 0


def test_predict_refuses_an_ensemble_of_different_configurations(tmp_path):
    from gliograde.inference.predict import PredictError, load_ensemble

    folds = fake_cv(tmp_path, k=2)
    (folds[1][0] / "config" / "config.json").write_text(json.dumps({"config": {"fold": 1, "folds": 2, "depth": 18}}))
    with pytest.raises(PredictError, match=r"different configurations.*depth"):
        load_ensemble([tmp_path])


def test_cv_through_the_local_launcher_and_its_status(cv_run, tmp_path, capsys, monkeypatch):
    cache, _, _ = cv_run
    out = tmp_path / "res"
    common = ["--preset", "cpu-demo", "--size", "16", "--cache-dir", str(cache.path), "--output-dir", str(out)]
    args = [*common, "--epochs", "1", "--min-epochs", "1", "--no-tensorboard", "--only", "0,1", "--allow-partial"]
    assert main(["cv", *args, "--launcher", "local", "--cpus-per-task", "1"]) == 0
    assert "Pooled out-of-fold" in capsys.readouterr().out
    assert main(["cv", "--status", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("done") >= 2
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["cv", *args, "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sbatch is not on PATH" in err and "\n" not in err


def test_cv_dry_run_plans_as_the_real_run_on_the_real_sample(sample_root, tmp_path, capsys, monkeypatch):
    """On the nine real cases (4 LGG) the dry run says what the real cv will do: 4 folds, the preset's batch of 8
    adapted to the smallest training part, and it writes nothing (no cache, no folder)."""
    monkeypatch.chdir(tmp_path)
    args = ["cv", "--preset", "cpu-demo", "--data-root", str(sample_root), "--cache-dir", str(tmp_path / "caches"),
            "--output-dir", str(tmp_path / "res"), "--dry-run"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "would train folds [0, 1, 2, 3] of K = 4" in out and "batch 2" in out
    assert "adapted to the cohort" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cv_dry_run_reads_the_saved_split_as_the_real_run_does(tiny_cache, tmp_path, capsys):
    """A cache whose folds.json has 4 folds x 2 repeats: the dry run says so (issue 21, §1), reading only."""
    import shutil

    from gliograde.data.splits import make_folds

    cache = tmp_path / "cache-s16"
    shutil.copytree(tiny_cache.path, cache)
    folds = make_folds(list(tiny_cache.ids), list(tiny_cache.labels), 4, 42, repeats=2)
    (cache / "folds.json").write_text(json.dumps(folds))
    before = sorted(p.name for p in cache.iterdir())
    common = ["cv", "--preset", "cpu-demo", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "res")]
    assert main([*common, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would train folds [0, 1, 2, 3] of K = 4 x 2 repeat(s)" in out and str(cache / "folds.json") in out
    assert sorted(p.name for p in cache.iterdir()) == before and not (tmp_path / "res").exists()
    assert main([*common, "--only", "2-3", "--dry-run"]) == 0
    assert "would train folds [2, 3] of K = 4" in capsys.readouterr().out
    assert main([*common, "--only", "4", "--dry-run"]) == 2  # fold 4 is outside a saved 4-fold split
    assert "outside 0..3" in capsys.readouterr().err
    assert main([*common, "--folds", "5", "--dry-run"]) == 2  # asking for another K is refused, as in the real run
    assert "holds a split with k=4, but k=5 was asked for" in capsys.readouterr().err
    assert main(["cv", "--preset", "cpu-demo", "--cache-dir", str(tmp_path / "none"), "--dry-run"]) == 0
    assert "would train folds [0, 1, 2, 3, 4] of K = 5 x 1 repeat(s) of a new split" in capsys.readouterr().out


def test_cv_status_lists_a_missing_fold_from_the_recorded_split(tmp_path, capsys):
    """K (and the repeats) come from the runs' recorded configuration, else the folds.json of their cache: a fold
    whose run folder is gone is listed as missing (issue 21, §1)."""
    import shutil

    from gliograde.data.splits import make_folds
    from gliograde.training.launcher import cv_status

    results = tmp_path / "res"
    folds = fake_cv(results, k=4)
    shutil.rmtree(folds[2][0])  # fold 2's run removed: its fold_2/ folder is left empty
    shutil.rmtree(results / "runs" / "fold_3")  # fold 3's folder removed altogether
    assert main(["cv", "--status", str(results)]) == 0
    table = capsys.readouterr().out.splitlines()
    states = {int(line.split()[1]): line.split()[2] for line in table[2:-1]}
    assert states == {0: "done", 1: "done", 2: "missing", 3: "missing"}
    assert table[-1] == "2 done, 2 missing"

    # runs that record no repeats (or no K): the saved folds.json of their cache tells, for each repeat
    cache = tmp_path / "cache"
    cache.mkdir()
    ids = [f"Brats18_TCIA0{i % 3}_{i:03d}_1" for i in range(24)]
    (cache / "folds.json").write_text(json.dumps(make_folds(ids, [i % 2 for i in range(24)], 4, 42, repeats=2)))
    for run in (results / "runs").glob("fold_*/run_*"):
        (run / "config" / "config.json").write_text(json.dumps({"config": {"cache_dir": str(cache)}}))
    rows = {(r["repeat"], r["fold"]): r["state"] for r in cv_status(results)}
    assert rows == {(0, 0): "done", (0, 1): "done", **{(0, f): "missing" for f in (2, 3)},
                    **{(1, f): "missing" for f in range(4)}}  # fmt: skip


# ------------------------------------------------------------------------- issue 25 §1: the folder names the network
def test_the_default_results_folder_follows_the_network(tmp_path, capsys):
    import shlex

    from test_training import SEED_COMMANDS

    from gliograde.cli import build_parser, config_from_args
    from gliograde.config import resolve

    assert resolve("cpu-demo").output_dir == "results/ResNet10-3D"  # it trained ResNet10-3D into results/ResNet50-3D
    assert resolve("final").output_dir == resolve("ldam-drw").output_dir == "results/ResNet50-3D"
    assert resolve("cpu-demo", model="mil2d").output_dir == "results/MIL2D-ResNet18"
    assert resolve("final", depth=18).output_dir == "results/ResNet18-3D"
    assert resolve("cpu-demo", output_dir="mine").output_dir == "mine"  # a folder asked for is kept
    path = tmp_path / "exp.yaml"
    path.write_text("output_dir: results/exp\n")
    assert resolve("cpu-demo", path).output_dir == "results/exp"
    for line, _ in SEED_COMMANDS.values():  # the seeds' ResNet-50 commands keep their folder
        assert config_from_args(build_parser().parse_args(["train", *shlex.split(line)])).output_dir == (
            "results/ResNet50-3D"
        )
    assert main(["cv", "--preset", "cpu-demo", "--cache-dir", str(tmp_path / "none"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "into results/ResNet10-3D" in out
    assert '"cpu-demo"  (command line)' in out and '"results/ResNet10-3D"  (default for the network)' in out
    assert main(["cv", "--cache-dir", str(tmp_path / "none"), "--dry-run"]) == 0
    assert '"final"  (default)' in capsys.readouterr().out


def test_summarize_and_predict_read_the_folder_of_the_configuration_given(cv_run, synth_root, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    """summarize and predict, given the configuration (--preset, --model/--depth, --config) and no folder, read
    the folder that configuration's cv wrote; given nothing, results/ResNet50-3D, and where that is absent but
    another network's folder is there, the one-line error names it."""
    _, cfg, _ = cv_run  # a cpu-demo CV: ResNet10-3D
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ResNet10-3D").symlink_to(Path(cfg.output_dir).resolve())
    assert main(["summarize", "--bootstrap", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--results results/ResNet50-3D" in err and "results/ResNet10-3D does" in err
    assert main(["summarize", "--preset", "cpu-demo", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("Model: ResNet10-3D (depth 10, strided layout); input 4 channel(s)")
    assert "at 16^3; preset cpu-demo" in printed.splitlines()[0]
    assert "Summary: results/ResNet10-3D/summary.md" in printed
    md = (tmp_path / "results" / "ResNet10-3D" / "summary.md").read_text()
    assert md.splitlines()[2].startswith("**Model.** ResNet10-3D")
    path = tmp_path / "exp.yaml"
    path.write_text("depth: 10\n")
    case = next(synth_root.glob("HGG/*"))
    for given in (["--depth", "10"], ["--config", str(path)]):
        out = tmp_path / f"pred{len(given[1])}"
        assert main(["predict", *given, "--case", str(case), "--out", str(out)]) == 0
        assert (out / "predictions.csv").is_file()
    assert main(["predict", "--model", "mil2d", "--case", str(case), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "--runs results/MIL2D-ResNet18" in err and "pass --runs results/ResNet10-3D" in err
    assert not (tmp_path / "p").exists()


def test_the_demo_lists_the_report_and_every_figure(cv_run, tmp_path):
    from gliograde.demo import demo_outputs

    _, cfg, report = cv_run
    listed = dict(demo_outputs(tmp_path / "data", tmp_path / "cache", report, tmp_path / "new", tmp_path / "pred"))
    assert listed["CV report (one page)"] == str(Path(cfg.output_dir) / "report.html")
    for name in ("cv_roc_curves.png", "cv_pr_curves.png", "cv_reliability.png"):
        assert name in listed["CV figures"]
        assert (Path(cfg.output_dir) / name).is_file()


# ------------------------------------------------------------------------------------------ issue 25 §3: messages
def test_cv_takes_one_fold_with_fold_and_says_where_k_came_from(tiny_cache, tmp_path, capsys):
    from gliograde.cli import build_parser

    assert build_parser().parse_args(["cv", "--fold", "2"]).fold_list == [2]  # no "ambiguous option" usage wall
    common = ["cv", "--preset", "cpu-demo", "--size", "16", "--cache-dir", str(tiny_cache.path), "--output-dir",
              str(tmp_path / "res")]  # fmt: skip
    for flag, value in (("--fold", "7"), ("--only", "7")):
        assert main([*common, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        saved = f"(K = 5, the saved split {tiny_cache.path / 'folds.json'})"  # where another test made it first
        assert "\n" not in err and "outside 0..4" in err and ("(K = 5, the default)" in err or saved in err)
        assert "set by --folds" not in err  # no --folds was given
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cv", "--fold", "0-2"])
    assert "several folds: --only 0-2" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("command", ["cv", "train"])
@pytest.mark.parametrize("flag", [("--device", "cuda"), ("--pretrained-path", "no_such_weights.pth")])
def test_a_missing_device_or_weights_file_is_refused_before_any_run_folder(tiny_cache, tmp_path, capsys, command, flag):
    out = tmp_path / "res"
    argv = [command, "--preset", "cpu-demo", "--size", "16", "--cache-dir", str(tiny_cache.path), "--output-dir",
            str(out), *flag]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("CUDA is not available" in err or "no_such_weights.pth does not exist" in err)
    assert not out.exists()  # no failed run folder


def test_cv_status_of_a_folder_that_is_not_there_is_an_error(tmp_path, capsys):
    assert main(["cv", "--status", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["cv", "--status", str(tmp_path / "empty")]) == 2
    assert "not the results folder of a cv" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_cv_fold_suggests_the_same_cv_command(tiny_cache, tmp_path, monkeypatch, caplog):
    """Ctrl-C inside a fold of `cv` said `gliograde train --fold 0 --resume ...`; the cv command resumes instead."""
    import os

    import gliograde.training.trainer as trainer

    real = trainer.train_fold

    def interrupted(cfg, **kw):
        def stop(epoch, run_dir):
            raise KeyboardInterrupt

        return real(cfg, on_epoch_end=stop)

    from conftest import tiny

    monkeypatch.setattr(trainer, "train_fold", interrupted)
    monkeypatch.delenv("GLIOGRADE_RESUME_HINT", raising=False)
    cfg = tiny(tiny_cache, tmp_path, epochs=2, min_epochs=2)
    with caplog.at_level("WARNING", logger="gliograde"), pytest.raises(KeyboardInterrupt):
        run_cv(cfg, [0])
    assert "interrupted; re-run the same gliograde cv command to resume" in caplog.text
    assert "gliograde train" not in caplog.text
    assert "GLIOGRADE_RESUME_HINT" not in os.environ  # `train` in the same process says its own hint again
    caplog.clear()
    with caplog.at_level("WARNING", logger="gliograde"), pytest.raises(KeyboardInterrupt):
        interrupted(dataclasses.replace(cfg, output_dir=str(tmp_path / "train")))
    assert "resume with: gliograde train --fold 0 --resume" in caplog.text
