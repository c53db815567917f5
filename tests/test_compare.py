"""`gliograde compare`: paired tests of two results folders on the same patients and folds, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import fake_run
from sklearn.metrics import roc_auc_score

from gliograde.evaluation import stats
from gliograde.evaluation.compare import CompareError, compare

N, K = 60, 3
IDS = [f"Brats18_TCIA0{i % 9}_{i:03d}_1" for i in range(N)]
LABELS = np.random.default_rng(1).permutation(np.array([1] * 36 + [0] * 24))
RNG = np.random.default_rng(2)
STRONG = np.clip(0.25 + 0.5 * LABELS + RNG.normal(0, 0.12, N), 0, 1)  # A: separates the grades well
NOISE = RNG.random(N)  # B: unrelated to the grade


def fold_map(repeat: int = 0) -> np.ndarray:
    """Each patient's fold in a repeat: a seeded permutation cut into K parts."""
    folds = np.empty(N, dtype=np.int64)
    for f, part in enumerate(np.array_split(np.random.default_rng(100 + repeat).permutation(N), K)):
        folds[part] = f
    return folds


def fold_run(results, fold, k, ids, labels, probs, repeat=0, threshold=0.5, protocol="inner", config=None):
    """A fold's run folder (conftest.fake_run) with what compare reads: the AUC, threshold, protocol and repeat."""
    final = {"auc": float(roc_auc_score(labels, probs)), "checkpoint": "best.pt"}
    if threshold is not None:
        final["threshold"] = threshold
    metrics = {"repeat": repeat} if protocol is None else {"repeat": repeat, "selection": {"protocol": protocol}}
    config = {"repeat": repeat, **(config or {})}
    return fake_run(results, fold, k, ids, labels, probs, repeat=repeat, final=final, metrics=metrics, config=config)


def fake_cv(results, probs, repeats=1, thresholds=(0.5,) * K, protocol="inner", ids=IDS, folds=None, config=None):
    """A K-fold CV of the N patients, `repeats` times (each repeat its own fold assignment)."""
    config = {
        "split_seed": 42,
        "repeats": repeats,
        "group_by": None,
        "leave_site_out": False,
        "inner_fraction": 0.2,
        **(config or {}),
    }
    for rep in range(repeats):
        fm = fold_map(rep) if folds is None else folds
        for f in range(K):
            sel = np.flatnonzero(fm == f)
            fold_run(
                results,
                f,
                K,
                [ids[i] for i in sel],
                LABELS[sel],
                probs[sel],
                rep,
                thresholds[f],
                protocol,
                config,
            )
    return results


def test_a_strong_model_beats_noise_on_every_paired_test(tmp_path):
    a, b = fake_cv(tmp_path / "a", STRONG), fake_cv(tmp_path / "b", NOISE, thresholds=(0.5, 0.4, 0.6))
    report = compare([a, b], n_boot=400, seed=3)
    (pr,) = report["pairs"]
    assert pr["n"] == N and pr["n_hgg"] == 36 and pr["k"] == K and sorted(pr["fold_sizes"]) == [20, 20, 20]
    assert pr["auc_a"]["auc"] == pytest.approx(roc_auc_score(LABELS, STRONG))
    assert pr["auc_b"]["auc"] == pytest.approx(roc_auc_score(LABELS, NOISE))
    d = pr["delong"]
    assert d["delta"] == pytest.approx(roc_auc_score(LABELS, NOISE) - roc_auc_score(LABELS, STRONG))
    assert d["delta"] < 0 and d["p_value"] < 0.01 and d["ci_high"] < 0
    bs = pr["bootstrap"]
    assert bs["ci_high"] < 0 and bs["delta"] == pytest.approx(d["delta"]) and bs["n_boot"] == 400
    assert compare([a, b], out=tmp_path / "again", n_boot=400, seed=3)["pairs"][0]["bootstrap"] == bs  # seeded
    # McNemar by hand: each run decides at its own fold's threshold
    thr_b = np.array([0.5, 0.4, 0.6])[fold_map(0)]
    right_a = (STRONG >= 0.5).astype(int) == LABELS
    right_b = (thr_b <= NOISE).astype(int) == LABELS
    mc = pr["mcnemar"]
    assert (mc["b"], mc["c"]) == (int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b)))
    assert mc["p_value"] == pytest.approx(stats.mcnemar_exact(right_a, right_b)["p_value"])
    assert pr["corrected_ttest"] is None and "two or more repeats" in pr["corrected_ttest_note"]
    assert pr["protocol_a"] == pr["protocol_b"] == "inner" and not pr["warnings"]
    assert pr["missing_a"] == [] and "evidence that B is worse" in pr["verdict"]
    # the outputs, in a new stamped folder inside the first results folder
    out = tmp_path / "a" / report["out"].rsplit("/", 1)[-1]
    assert out.name.startswith("compare_") and out.is_dir()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["pairs"][0]["delong"]["delta"] == pytest.approx(d["delta"])
    md = (out / "compare.md").read_text()
    assert "B - A = " in md and "DeLong p" in md and "McNemar" in md and "| 0 | 0 | 20 |" in md
    assert (out / "compare_roc.png").stat().st_size > 1000


def test_identical_folders_differ_by_nothing(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG)
    shutil.copytree(a, tmp_path / "b")
    pr = compare([a, tmp_path / "b"], out=tmp_path / "out", n_boot=200)["pairs"][0]
    assert pr["delong"]["delta"] == 0 and pr["delong"]["p_value"] == 1
    assert pr["bootstrap"]["delta"] == 0 and pr["bootstrap"]["ci_low"] == pr["bootstrap"]["ci_high"] == 0
    assert (pr["mcnemar"]["b"], pr["mcnemar"]["c"], pr["mcnemar"]["p_value"]) == (0, 0, 1.0)
    assert "no evidence of a difference" in pr["verdict"]
    assert "no evidence of a difference" in (tmp_path / "out" / "compare.md").read_text()


def test_different_patients_are_refused(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG)
    other = [*IDS[:-2], "Brats18_CBICA_AAA_1", "Brats18_CBICA_AAB_1"]
    b = fake_cv(tmp_path / "b", NOISE, ids=other)
    with pytest.raises(CompareError, match="different patient sets: 2 only in A") as e:
        compare([a, b], out=tmp_path / "out")
    assert "Brats18_CBICA_AAA_1" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written for a refused comparison


def test_the_same_patients_in_other_folds_are_refused(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG)
    swapped = fold_map(0).copy()
    swapped[fold_map(0) == 0], swapped[fold_map(0) == 1] = 1, 0
    b = fake_cv(tmp_path / "b", NOISE, folds=swapped)
    with pytest.raises(CompareError, match=r"fold 0 of A .* validates 20 patients that B .* not the same folds"):
        compare([a, b], out=tmp_path / "out")


def test_different_k_or_split_settings_are_refused_naming_both(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG)
    b = fake_cv(tmp_path / "b", NOISE, config={"split_seed": 7})
    with pytest.raises(CompareError, match=r"split_seed = 42.*split_seed = 7"):
        compare([a, b], out=tmp_path / "out")
    c = tmp_path / "c"
    for f in range(2):
        sel = np.flatnonzero(np.arange(N) % 2 == f)
        fold_run(c, f, 2, [IDS[i] for i in sel], LABELS[sel], NOISE[sel])
    with pytest.raises(CompareError, match=r"K = 3 folds.*K = 2"):
        compare([a, c], out=tmp_path / "out")
    with pytest.raises(CompareError, match="no finished fold in"):
        (tmp_path / "empty" / "runs" / "fold_0").mkdir(parents=True)
        compare([a, tmp_path / "empty"], out=tmp_path / "out")


def test_a_patient_labelled_differently_is_refused(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG)
    b = fake_cv(tmp_path / "b", NOISE)
    fold0 = next((b / "runs" / "fold_0").glob("run_*")) / "predictions"
    labels = np.load(fold0 / "val_labels.npy")
    labels[0] = 1 - labels[0]
    np.save(fold0 / "val_labels.npy", labels)
    first = json.loads((fold0 / "val_ids.json").read_text())[0]
    with pytest.raises(CompareError, match=f"patient {first} is labelled"):
        compare([a, b], out=tmp_path / "out")


def test_two_repeats_give_the_corrected_resampled_ttest(tmp_path):
    a, b = fake_cv(tmp_path / "a", STRONG, repeats=2), fake_cv(tmp_path / "b", NOISE, repeats=2)
    pr = compare([a, b], out=tmp_path / "out", n_boot=200)["pairs"][0]
    assert pr["repeats"] == [0, 1] and len(pr["per_repeat"]) == 2 and len(pr["per_fold"]) == 2 * K
    t = pr["corrected_ttest"]
    assert t["J"] == 2 * K and t["df"] == 2 * K - 1 and (t["n_test"], t["n_train"]) == (20, 40)
    assert t["n_train_source"].startswith("outer training size")  # these fake runs record no n_fit
    diffs = []
    for rep in range(2):
        fm = fold_map(rep)
        for f in range(K):
            y = LABELS[fm == f]
            diffs.append(roc_auc_score(y, NOISE[fm == f]) - roc_auc_score(y, STRONG[fm == f]))
    assert [r["diff"] for r in pr["per_fold"]] == pytest.approx(diffs)
    assert t["p_value"] == pytest.approx(stats.corrected_resampled_ttest(diffs, 40, 20)["p_value"])
    assert t["mean"] < 0 and t["p_value"] < 0.01
    assert "corrected resampled t-test over 6" in (tmp_path / "out" / "compare.md").read_text()


def test_the_corrected_ttest_uses_the_patients_the_networks_were_fitted_on(tmp_path):
    """Nadeau & Bengio's n_train is the training set of the models compared: with inner selection the networks fit
    on final.selection.n_fit patients (32 of the 40 outer-training ones here, inner_fraction 0.2), not on 40."""
    a, b = fake_cv(tmp_path / "a", STRONG, repeats=2), fake_cv(tmp_path / "b", NOISE, repeats=2)
    for side in (a, b):
        for path in side.glob("runs/**/metrics/metrics.json"):
            m = json.loads(path.read_text())
            m["final"]["selection"] = {"protocol": "inner", "n_fit": 32, "n_select": 8, "n_reported": 20}
            path.write_text(json.dumps(m))
    t = compare([a, b], out=tmp_path / "out", n_boot=50)["pairs"][0]["corrected_ttest"]
    assert (t["n_train"], t["n_test"]) == (32, 20) and t["n_train_source"].startswith("n_fit")
    diffs = []
    for rep in range(2):
        fm = fold_map(rep)
        diffs += [roc_auc_score(LABELS[fm == f], NOISE[fm == f]) - roc_auc_score(LABELS[fm == f], STRONG[fm == f])
                  for f in range(K)]  # fmt: skip
    # t = mean / sqrt(var (1/J + n_test/n_train)) with n_test/n_train = 20/32, not 20/40
    d = np.asarray(diffs)
    expected = d.mean() / np.sqrt(d.var(ddof=1) * (1 / 6 + 20 / 32))
    assert t["t"] == pytest.approx(expected)
    assert t["t"] != pytest.approx(stats.corrected_resampled_ttest(d, 40, 20)["t"])  # the outer size would differ


def test_old_runs_note_what_is_missing_and_outer_selection_warns(tmp_path):
    a = fake_cv(tmp_path / "a", STRONG, thresholds=(None,) * K, protocol=None)
    b = fake_cv(tmp_path / "b", NOISE, protocol="inner")
    c = fake_cv(tmp_path / "c", STRONG)
    report = compare([a, b, c], out=tmp_path / "out", n_boot=100)
    assert [p["name_b"] for p in report["pairs"]] == ["B1", "B2"]
    pr = report["pairs"][0]
    assert "threshold (0.5 assumed)" in pr["missing_a"] and "selection protocol (outer assumed)" in pr["missing_a"]
    assert pr["missing_b"] == [] and pr["protocol_a"] == "outer" and pr["protocol_b"] == "inner"
    assert any("selected differently" in w for w in pr["warnings"])
    assert any("optimistic" in w for w in pr["warnings"])
    right_a = (STRONG >= 0.5).astype(int) == LABELS  # the assumed 0.5 threshold
    right_b = (NOISE >= 0.5).astype(int) == LABELS
    assert pr["mcnemar"]["b"] == int(np.sum(right_a & ~right_b))
    assert report["pairs"][1]["delong"]["delta"] == 0


def test_an_out_folder_that_holds_files_is_refused(tmp_path):
    a, b = fake_cv(tmp_path / "a", STRONG), fake_cv(tmp_path / "b", NOISE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CompareError, match="already holds files"):
        compare([a, b], out=out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    compare([a, b], out=tmp_path / "empty", n_boot=50)  # an empty folder is fine
    assert (tmp_path / "empty" / "compare.json").is_file()
    with pytest.raises(CompareError, match="two or more"):
        compare([a])
