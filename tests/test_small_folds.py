"""Numbers that hold with three LGG patients in a fold (issue 20, section 1): intervals that do not collapse, a grade
that is absent reads undefined (not 0), one operating point in every table, the per-fold mean as the headline
beside the pooled AUC, unknown sites counted apart, every method named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_run

from gliograde.evaluation import stats
from gliograde.evaluation.metrics import compute_metrics
from gliograde.evaluation.site_baseline import site_audit, site_baseline, site_warning
from gliograde.evaluation.summary import summarize


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """Three folds; fold 2 holds no LGG patient. Thresholds 0.3, 0.6, 0.45 (not 0.5). The 2013 cohort is mixed, and
    two patients have ids that name no site."""
    results = tmp_path_factory.mktemp("results")
    cache = results / "cache"
    cache.mkdir()
    folds = [
        # (ids, labels, probs, threshold)
        (["Brats18_2013_0_1", "Brats18_2013_1_1", "Brats18_TCIA10_2_1", "Brats18_CBICA_3_1", "Brats18_CBICA_4_1",
          "patient_a"],
         [0, 1, 0, 1, 1, 0], [0.40, 0.35, 0.10, 0.90, 0.80, 0.20], 0.3),
        (["Brats18_2013_5_1", "Brats18_2013_6_1", "Brats18_TCIA10_7_1", "Brats18_CBICA_8_1", "Brats18_CBICA_9_1",
          "patient_b"],
         [1, 0, 0, 1, 1, 1], [0.55, 0.58, 0.20, 0.95, 0.70, 0.65], 0.6),
        (["Brats18_2013_10_1", "Brats18_CBICA_11_1", "Brats18_CBICA_12_1", "Brats18_TCIA01_13_1"],
         [1, 1, 1, 1], [0.50, 0.90, 0.40, 0.70], 0.45),
    ]  # fmt: skip
    entries, all_ids = [], []
    for f, (ids, labels, probs, thr) in enumerate(folds):
        final = {**compute_metrics(labels, probs, thr), "threshold": thr, "best_epoch": 2, "checkpoint": "b"}
        fake_run(results, f, 3, ids, labels, probs, final=final, config={"cache_dir": str(cache)})
        entries.append({"fold": f, "val": ids})
        all_ids += ids
    for e in entries:
        e["train"] = [i for i in all_ids if i not in set(e["val"])]
    (cache / "folds.json").write_text(json.dumps({"k": 3, "seed": 0, "case_ids": all_ids, "folds": entries}))
    return results, summarize(results, bootstrap=100), folds


# ----------------------------------------------------------------------------------- intervals that do not collapse
def _newcombe_lower_by_polynomial(auc: float, m: int, n: int, z: float) -> float:
    """Newcombe (2006), Stat Med 25:559-573, method 5, solved independently: with N* = (m + n)/2 - 1, the limits are
    roots of the quartic mn (auc - t)^2 (2 - t)(1 + t) = z^2 t (1 - t) [(2 - t)(1 + t) + N* (1 - t)(1 + t)
    + N* t (2 - t)], found here with numpy's companion-matrix root finder (the code uses Brent's method)."""
    from numpy.polynomial import Polynomial as P

    t, star = P([0, 1]), (m + n) / 2 - 1
    d = (2 - t) * (1 + t)
    quartic = m * n * (auc - t) ** 2 * d - z**2 * t * (1 - t) * (d + star * (1 - t) * (1 + t) + star * t * (2 - t))
    roots = [r.real for r in quartic.roots() if abs(r.imag) < 1e-9 and 0 < r.real < auc - 1e-9]
    return min(roots, key=lambda r: abs(r - auc))  # the root next below auc (t = auc = 1 is a root too)


def test_three_lgg_perfectly_separated_keep_a_wide_interval():
    y = np.r_[np.ones(9, dtype=int), np.zeros(3, dtype=int)]  # 9 HGG, 3 LGG
    s = np.r_[np.linspace(0.6, 0.9, 9), [0.1, 0.2, 0.3]]  # every HGG above every LGG: AUC = 1
    d = stats.delong_auc(y, s)
    assert d["se"] == 0 and d["ci_high"] - d["ci_low"] < 1e-12 and d["degenerate"]  # DeLong collapses
    r = stats.auc_interval(y, s)
    # 0.6210: Newcombe (2006) method 5 for m = 9, n = 3, AUC = 1 (the root of the quartic above)
    assert r["auc"] == 1.0 and r["ci_high"] == 1.0 and round(r["ci_low"], 4) == 0.6210
    assert r["ci_low"] == pytest.approx(_newcombe_lower_by_polynomial(1.0, 9, 3, stats.Z95), abs=1e-9)
    assert r["method"].startswith("Newcombe (2006)")


@pytest.mark.parametrize(("auc", "m", "n"), [(0.8, 50, 50), (0.6, 9, 3), (0.95, 20, 5), (1.0, 40, 40)])
def test_newcombe_limits_are_the_roots_of_his_equation(auc, m, n):
    lo, hi = stats.newcombe_auc_ci(auc, m, n)
    assert lo == pytest.approx(_newcombe_lower_by_polynomial(auc, m, n, stats.Z95), abs=1e-9)
    if auc < 1:
        assert 1 - hi == pytest.approx(_newcombe_lower_by_polynomial(1 - auc, m, n, stats.Z95), abs=1e-9)
    assert lo < auc <= hi


def test_all_scores_tied_and_auc_zero_keep_a_width():
    y = np.r_[np.ones(9, dtype=int), np.zeros(3, dtype=int)]
    tied = stats.auc_interval(y, np.full(12, 0.7))
    assert tied["auc"] == 0.5 and tied["ci_low"] < 0.3 and tied["ci_high"] > 0.7
    assert stats.newcombe_auc_ci(0.0, 9, 3) == pytest.approx((0.0, 1 - 0.6209951820892784))
    # one patient of each grade: N* = 0, V = t(1 - t), the lower limit solves 1 - t = z^2 t (Wilson's, n = 1)
    assert stats.newcombe_auc_ci(1.0, 1, 1)[0] == pytest.approx(1 / (1 + stats.Z95**2))


# ----------------------------------------------------------------------------------- an absent grade is undefined
def test_a_cohort_without_lgg_has_no_specificity_and_no_balanced_accuracy():
    m = compute_metrics([1, 1, 1], [0.9, 0.8, 0.2])
    assert math.isnan(m["specificity"]) and math.isnan(m["balanced_accuracy"]) and math.isnan(m["f1"])
    assert math.isnan(m["auc"]) and m["sensitivity"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    both = compute_metrics([1, 1, 1, 0], [0.9, 0.8, 0.2, 0.1])
    assert both["specificity"] == 1.0 and both["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_the_fold_without_lgg_reads_na_and_stays_out_of_the_means(cv):
    results, report, folds = cv
    row = report["folds"][2]
    assert math.isnan(row["specificity"]) and math.isnan(row["balanced_accuracy"]) and math.isnan(row["auc"])
    assert row["auc_ci95"] is None and row["n_lgg"] == 0
    spec = [compute_metrics(lb, p, t)["specificity"] for _, lb, p, t in folds[:2]]
    assert report["mean"]["specificity"] == pytest.approx(np.mean(spec)) and report["n_folds"]["specificity"] == 2
    assert report["n_folds"]["sensitivity"] == 3 and report["n_folds"]["auc"] == 2
    assert "(n = 2 of 3)" in (results / "summary.md").read_text()
    text = (results / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # JSON null, not NaN tokens
    assert json.loads(text)["folds"][2]["specificity"] is None
    assert "n = 2 of 3" in (results / "report.html").read_text()


# ----------------------------------------------------------------------------------- one operating point everywhere
def test_the_2013_cohort_and_the_site_table_use_each_folds_threshold(cv):
    _, report, _ = cv
    cohort = report["sites"]["mixed_cohort"]
    assert cohort["accuracy"] == pytest.approx(report["sites"]["sites"]["2013"]["accuracy"])
    # by hand: 2013 patients (label, P, fold threshold): (0,.40,.3) wrong, (1,.35,.3) right, (1,.55,.6) wrong,
    # (0,.58,.6) right, (1,.50,.45) right -> 3/5; at 0.5 it would have been 2/5
    assert cohort["accuracy"] == pytest.approx(3 / 5) and cohort["n"] == 5
    assert cohort["auc_ci"]["method"].startswith("Newcombe")


# ----------------------------------------------------------------------------------- per fold first, pooled beside it
def test_the_headline_is_the_mean_of_the_folds_with_the_pooled_auc_beside_it(cv):
    results, report, _ = cv
    h = report["headline"]
    assert h["auc_mean_of_folds"] == report["mean"]["auc"] and h["auc_folds"] == 2
    assert h["auc_pooled"] == report["pooled"]["auc"] and h["auc_pooled_ci95"] is not None
    assert "different models" in h["explanation"]
    md = (results / "summary.md").read_text()
    assert md.index("## Headline") < md.index("## Per fold") < md.index("## Pooled out-of-fold")
    assert "Mean of the per-fold AUCs" in md and h["explanation"] in md
    assert json.loads((results / "summary.json").read_text())["headline"]["explanation"] == h["explanation"]


def test_every_method_is_named(cv):
    results, report, _ = cv
    methods = json.loads((results / "summary.json").read_text())["methods"]
    assert methods["auc_ci"].startswith("Newcombe (2006)") and "Wilson" in methods["rates_ci"]
    assert "10 equal-width bins" in methods["ece"] and "stratified" in methods["auc_bootstrap"]
    assert report["pooled"]["calibration"]["binning"].startswith("10 equal-width")
    assert report["pooled"]["auc_ci"]["method"] == stats.AUC_CI_METHOD


# ----------------------------------------------------------------------------------- sites
def test_ids_that_name_no_site_are_counted_apart_not_as_a_site():
    ids = ["Brats18_CBICA_1_1", "Brats18_CBICA_2_1", "Brats18_2013_3_1", "Brats18_2013_4_1", "x_1", "x_2"]
    audit = site_audit(ids, [1, 1, 1, 0, 1, 1])
    assert audit["sites"]["unknown"]["single_grade"] is None  # not "a single-grade site"
    assert audit["known_sites"] == 2 and audit["patients_with_known_site"] == 4
    assert audit["patients_in_single_grade_sites"] == 2 and audit["patients_with_unknown_site"] == 2
    warning = site_warning(audit)
    assert "2 of 4 patients with a known site" in warning and "2 more patients" in warning


def test_the_site_baseline_does_not_learn_unknown_ids_as_one_site():
    # every id without a site is HGG in training: were "unknown" a site (or the reference category), the baseline
    # would call the held-out unknown patients HGG with confidence; they get the training prior instead
    train = [f"p_{i}" for i in range(8)] + [f"Brats18_TCIA10_{i}_1" for i in range(8)]
    val = ["p_x", "Brats18_TCIA10_x_1"]
    ids, labels = train + val, [1] * 8 + [0] * 8 + [1, 0]
    folds = {"folds": [{"fold": 0, "train": train, "val": val}]}
    res = site_baseline(ids, labels, folds, protocol="outer")
    p_unknown = dict(zip(res["ids"], res["probs"], strict=True))["p_x"]
    assert p_unknown == pytest.approx(0.5)  # the prior: 8 HGG of 16 training patients


# ----------------------------------------------------------------------------------- issue 25 §2: plan before working
# On the nine real cases (5 HGG, 4 LGG) `prepare` preprocessed everything and then refused 5 folds; `cv --preset
# cpu-demo` built a second cache and then failed every fold on a batch of 8 for 4 training cases. Now the plan comes
# first: from the scan (file headers only), before any case is preprocessed and before any run folder is made.
def _never_preprocess(monkeypatch):
    import gliograde.data.cache as cache_module

    monkeypatch.setattr(cache_module, "_run_parallel", lambda *a: pytest.fail("a case was preprocessed"))


def test_prepare_refuses_explicit_folds_before_preprocessing(sample_root, tmp_path, monkeypatch, capsys):
    from gliograde.cli import main

    _never_preprocess(monkeypatch)
    out = tmp_path / "cache"
    assert main(["prepare", "--data-root", str(sample_root), "--out", str(out), "--folds", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--folds 5: LGG has 4 case(s)" in err[0] and err[0].endswith("pass --folds 4")
    assert not out.exists()


def test_prepare_adapts_the_default_folds_to_the_smaller_grade(sample_root, real_cache, tmp_path, caplog):
    """A copy of the real 128^3 cache, which `prepare` finds up to date: the folds it then writes are the plan's."""
    import shutil

    from gliograde.cli import main

    out = tmp_path / "cache"
    shutil.copytree(real_cache.path, out, ignore=shutil.ignore_patterns("folds.json"))
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["prepare", "--data-root", str(sample_root), "--out", str(out)]) == 0
    folds = json.loads((out / "folds.json").read_text())
    assert folds["k"] == 4 and sorted(folds["class_counts"].items()) == [("HGG", 5), ("LGG", 4)]
    assert (
        "adapted to the cohort: 4 LGG: 4 folds (the default 5 needs at least 5 patients of each grade)" in caplog.text
    )
    assert "is up to date" in caplog.text  # nothing preprocessed again


def _demo_cfg(sample_root, tmp_path, **kw):
    from gliograde.config import resolve

    values = {"data_root": str(sample_root), "cache_dir": str(tmp_path / "cache"),
              "output_dir": str(tmp_path / "res"), **kw}  # fmt: skip
    return resolve("cpu-demo", **values)


def test_cv_plan_adapts_the_preset_batch_and_the_default_folds_without_writing(sample_root, tmp_path, monkeypatch):
    from gliograde.training.plan import plan_run

    _never_preprocess(monkeypatch)
    (tmp_path / "cache").mkdir()
    plan = plan_run(_demo_cfg(sample_root, tmp_path), explicit=set())
    fits = [len(f["fit"]) for f in plan.split["folds"]]
    assert plan.cfg.folds == 4 and plan.folds == [0, 1, 2, 3] and min(fits) == 4
    assert plan.cfg.batch_size == 2 and plan.cfg.grad_accum == 1  # the preset's 8 exceeded the 4 training cases
    assert plan.cfg.adaptations == [
        "4 LGG: 4 folds (the default 5 needs at least 5 patients of each grade)",
        f"4 training cases in fold {fits.index(4)}: batch 2 (not 8)",
    ]
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "res").exists()


def test_cv_refuses_an_explicit_batch_before_any_cache_or_run_folder(sample_root, tmp_path, monkeypatch, capsys):
    from gliograde.cli import main

    _never_preprocess(monkeypatch)
    argv = ["cv", "--preset", "cpu-demo", "--data-root", str(sample_root), "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "res"), "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 8 exceeds the 4 training cases of fold" in err[0]
    assert err[0].endswith("pass --batch-size 4 or less") and "9 cases in 4 folds" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_cache_at_another_size_is_named_and_its_split_taken_over(sample_root, tmp_path, caplog):
    from gliograde.data.brats import discover_cases
    from gliograde.data.splits import make_folds
    from gliograde.training.plan import plan_run

    cases = discover_cases(sample_root).cases
    other = tmp_path / "cache" / f"{sample_root.resolve().name}-s128"  # what `prepare` made with its defaults
    other.mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"data_root": str(sample_root.resolve()), "params": {"size": 128}}))
    split = make_folds([c.id for c in cases], [c.label for c in cases], 3, 11)
    (other / "folds.json").write_text(json.dumps(split))
    with caplog.at_level("WARNING", logger="gliograde"):
        plan = plan_run(_demo_cfg(sample_root, tmp_path), explicit=set())
    assert plan.split == split and plan.cfg.folds == 3 and plan.cfg.split_seed == 11
    line = next(r.getMessage() for r in caplog.records if str(other) in r.getMessage())
    assert "the cpu-demo preset's size is 32" in line and "with the same split" in line and "--size 128" in line
    # `prepare --size 32` beside it takes the same split over, unless another one is asked for
    from gliograde.data.brats import discover_cases
    from gliograde.data.source import plan_prepare
    from gliograde.data.splits import SplitSpec

    target = tmp_path / "cache" / f"{sample_root.resolve().name}-s32"
    found = discover_cases(sample_root)
    assert plan_prepare(found, target, 32).k == 3
    assert plan_prepare(found, target, 32, SplitSpec(k=4)).k == 4
    assert not target.exists()


def test_a_named_cache_sets_the_size_unless_size_is_given(tiny_cache, tmp_path):
    from gliograde.config import ConfigError, resolve
    from gliograde.training.plan import plan_run

    cfg = resolve("cpu-demo", cache_dir=str(tiny_cache.path), output_dir=str(tmp_path / "res"))  # the preset: 32
    plan = plan_run(cfg, explicit=set())
    assert plan.cfg.size == 16 and plan.cfg.adaptations[0].endswith("holds 16^3 volumes: size 16 (not 32)")
    with pytest.raises(ConfigError, match=r"^--size 32, but --cache-dir .* holds 16\^3 volumes: pass --size 16"):
        plan_run(cfg, explicit={"size"})


@pytest.mark.slow
def test_the_adaptation_is_recorded_in_the_run_config(tiny_cache, tmp_path):
    """A batch the cohort cannot hold, not set by the user (explicit=set()): trained with the planned one, and the
    run's config.json says so."""
    from conftest import tiny

    from gliograde.training.cv import run_cv

    cfg = tiny(tiny_cache, tmp_path, batch_size=64, epochs=1, min_epochs=1)
    report = run_cv(cfg, [0], explicit=set())
    run = report["folds"][0]["run"]
    config = json.loads((Path(run) / "config" / "config.json").read_text())["config"]
    assert config["batch_size"] < 64 and len(config["adaptations"]) == 1
    assert config["adaptations"][0].endswith(f"batch {config['batch_size']} (not 64)")
