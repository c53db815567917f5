"""validate: the CV ensemble on a labelled cohort it never saw; the leakage check, input quality, the refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gliograde.cli import main
from gliograde.data.synthetic import synthesize
from gliograde.inference.qc import NOT_ENOUGH, OOD_ALPHA, MemberReference, TrainingReference, conformal_threshold
from gliograde.inference.validate import OVERLAP_LABEL, cv_reference


def _rewrite(case_dir: Path, change) -> None:
    """Rewrite every NIfTI file of a case folder: change(data, affine) -> (data, affine)."""
    for f in sorted(case_dir.glob("*.nii.gz")):
        img = nib.load(str(f))
        data, affine = change(np.asarray(img.dataobj), img.affine.copy(), f.name.endswith("_seg.nii.gz"))
        nib.save(nib.Nifti1Image(data, affine), str(f))


def _not_skull_stripped(data, affine, seg):
    return (data if seg else np.where(data == 0, -100, data).astype(np.int16)), affine


def _two_mm(data, affine, seg):
    affine[:3, :3] *= 2.0
    return data, affine


def _rename_copy(src: Path, dst_parent: Path, new_id: str) -> Path:
    """A case folder copied under a new id, its files renamed: the same patient under another name."""
    dst = dst_parent / new_id
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.rename(dst / f.name.replace(src.name, new_id))
    return dst


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 unseen phantoms (another seed, case numbers from 1000), one rewritten with a negative background (not
    skull-stripped) and one with 2 mm voxels."""
    root, _ = synthesize(tmp_path_factory.mktemp("ext") / "cohort", 12, (48, 48, 40), seed=101, workers=1,
                         progress=False, first_index=1000)  # fmt: skip
    cases = sorted(root.glob("*/Brats18_*"))
    _rewrite(cases[0], _not_skull_stripped)
    _rewrite(cases[1], _two_mm)
    return root


@pytest.fixture(scope="module")
def validated(cv_run, cohort, tmp_path_factory):
    _, cfg, _ = cv_run
    out = tmp_path_factory.mktemp("val") / "validation"
    assert main(["validate", "--runs", cfg.output_dir, "--data-root", str(cohort), "--out", str(out)]) == 0
    return out, json.loads((out / "validation.json").read_text())


def test_the_auc_is_that_of_its_own_predictions(validated, cohort):
    out, report = validated
    rows = _csv(out / "predictions.csv")
    assert len(rows) == report["metrics"]["n"] == 12
    y = [int(r["true_grade"] == "HGG") for r in rows]
    p = [float(r["p_hgg"]) for r in rows]
    assert report["metrics"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    ci = report["metrics"]["auc_ci"]
    assert ci["method"].startswith("Newcombe (2006)") and ci["ci_low"] < ci["ci_high"]  # never zero width
    threshold = report["ensemble"]["threshold"]
    for r in rows:  # the ensemble's own operating point, the one predict uses
        assert float(r["threshold"]) == pytest.approx(threshold)
        assert r["predicted_grade"] == ("HGG" if float(r["p_hgg"]) >= threshold else "LGG")
        assert r["site"] in ("SYNA", "SYNB", "SYNC") and r["cohort_label"] == ""
    rates = report["metrics"]["rates"]
    for key in ("sensitivity", "specificity", "balanced_accuracy", "ppv", "npv"):
        assert rates[key]["ci_low"] <= rates[key]["value"] <= rates[key]["ci_high"]
    cal = report["metrics"]["calibration"]
    assert cal["binning"].startswith("10 equal-width bins") and 0 <= cal["ece"] <= 1 and 0 <= cal["brier"] <= 1
    # the CV beside it (from summary.json), the site table without "unknown" counted, no overlap
    assert report["cv"]["auc_mean_of_folds"] is not None and "summary.json" in report["cv"]["source"]
    assert report["sites"]["known_sites"] == len(report["sites"]["sites"])
    assert report["label"] is None and report["leakage"]["shared"] == []
    assert "image hash of the preprocessed volume" in report["leakage"]["checked_by"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # 3 validation figures + the CV's ROC and reliability
    assert 'src="validation' not in html and "<script" not in html
    assert (out / "validation.md").read_text().startswith("# External validation")


def test_input_quality_flags(validated, cohort):
    out, report = validated
    cases = sorted(cohort.glob("*/Brats18_*"))
    flags = {r["case"]: r["qc_flags"].split() for r in _csv(out / "predictions.csv")}
    stripped, coarse = cases[0].name, cases[1].name
    assert "negative_intensities" in flags[stripped] and "brain_fraction_out_of_range" in flags[stripped]
    assert "spacing_not_1mm" in flags[coarse] and "negative_intensities" not in flags[coarse]
    assert all("grid_not_brats" in f for f in flags.values())  # 48 x 48 x 40 phantoms
    others = [c.name for c in cases[2:]]
    assert not any("spacing_not_1mm" in flags[c] or "negative_intensities" in flags[c] for c in others)
    record = next(r for r in report["predictions"] if r["case"] == coarse)
    assert record["qc"]["spacing_mm"] == [2.0, 2.0, 2.0]
    qc = report["cohort"]["qc"]
    assert qc["negative_intensities"]["cases"] == [stripped] and qc["spacing_not_1mm"]["cases"] == [coarse]
    methods = report["qc_methods"]
    assert "nearest training patients" in methods["out_of_distribution"] and len(methods["members"]) == 3
    assert all(m["threshold"] > 0 for m in methods["members"])
    assert "negative_intensities" in (out / "validation.md").read_text()


def test_a_renamed_training_case_is_refused_and_allow_overlap_labels_everything(
    cv_run, cohort, synth_root, tmp_path, capsys
):
    _, cfg, _ = cv_run
    data = tmp_path / "leaky"
    (data / "HGG").mkdir(parents=True)
    shutil.copytree(next((cohort / "HGG").iterdir()), data / "HGG" / next((cohort / "HGG").iterdir()).name)
    training = sorted((synth_root / "HGG").iterdir())[0]
    _rename_copy(training, data / "HGG", "Brats18_SYNB_7777_1")
    out = tmp_path / "out"
    argv = ["validate", "--runs", cfg.output_dir, "--data-root", str(data), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Brats18_SYNB_7777_1" in err and training.name in err
    assert not out.exists()  # nothing written

    assert main([*argv, "--allow-overlap"]) == 0
    report = json.loads((out / "validation.json").read_text())
    assert report["label"] == OVERLAP_LABEL and OVERLAP_LABEL in report["title"]
    assert report["leakage"]["shared"][0]["case"] == "Brats18_SYNB_7777_1"
    assert report["leakage"]["shared"][0]["matches"][0]["training_case"] == training.name
    rows = {r["case"]: r for r in _csv(out / "predictions.csv")}
    assert all(r["cohort_label"] == OVERLAP_LABEL for r in rows.values())
    assert training.name in rows["Brats18_SYNB_7777_1"]["shared_with_training"]
    for name in ("validation.md", "report.html"):
        text = (out / name).read_text()
        assert OVERLAP_LABEL in text and "Brats18_SYNB_7777_1" in text
    # a cohort of HGG only: specificity and NPV undefined -> null / n/a, never 0
    assert report["metrics"]["specificity"] is None and report["metrics"]["auc"] is None
    assert report["metrics"]["rates"]["specificity"]["value"] is None
    assert report["metrics"]["rates"]["balanced_accuracy"]["ci_low"] is None
    assert "| Specificity (LGG called LGG) | n/a |" in (out / "validation.md").read_text()
    assert main([*argv, "--allow-overlap"]) == 2  # an --out holding files is refused


def test_a_case_id_seen_in_training_is_refused(cv_run, synth_root, tmp_path, capsys):
    _, cfg, _ = cv_run
    data = tmp_path / "same_id"
    (data / "LGG").mkdir(parents=True)
    case = sorted((synth_root / "LGG").iterdir())[0]
    shutil.copytree(case, data / "LGG" / case.name.replace("Brats18_", "BraTS19_"))  # BraTS 2019 spelling
    for f in (data / "LGG" / case.name.replace("Brats18_", "BraTS19_")).iterdir():
        f.rename(f.with_name(f.name.replace("Brats18_", "BraTS19_")))
    assert main(["validate", "--runs", cfg.output_dir, "--data-root", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "case id" in err and case.name in err and not (tmp_path / "o").exists()


def test_a_large_overlap_is_counted_begun_and_listed_in_a_file(cv_run, synth_root, tmp_path, capsys):
    """Issue 25 §3: the refusal listed every shared case on one line (285 of them: a wall). Now: the count, the
    first three, and the file that lists them all."""
    _, cfg, _ = cv_run
    data = tmp_path / "all_seen"
    shared = sorted((synth_root / "HGG").iterdir())[:5]
    for case in shared:
        shutil.copytree(case, data / "HGG" / case.name)
    out = tmp_path / "o"
    assert main(["validate", "--runs", cfg.output_dir, "--data-root", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    listing = tmp_path / "o.overlap.csv"
    assert len(err.splitlines()) == 1 and "shares 5 patient(s) with the training folds" in err
    assert "; and 2 more; all of them in " + str(listing) in err
    assert sum(case.name in err for case in shared) == 3 and not out.exists()
    rows = _csv(listing)
    assert sorted({r["case"] for r in rows}) == sorted(c.name for c in shared)  # a row per match (id, image)
    assert {r["by"] for r in rows} >= {"case id"} and all(r["training_case"] for r in rows)


def test_a_cohort_without_grades_is_refused_in_one_line(cv_run, cohort, tmp_path, capsys):
    _, cfg, _ = cv_run
    flat = tmp_path / "flat"
    flat.mkdir()
    case = next((cohort / "LGG").iterdir())
    shutil.copytree(case, flat / case.name)
    out = tmp_path / "o"
    assert main(["validate", "--runs", cfg.output_dir, "--data-root", str(flat), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HGG/ and LGG/" in err and "name_mapping.csv" in err
    assert not out.exists()


def test_the_cv_figures_without_summary_json_are_computed_as_summarize_does(cv_run, tmp_path):
    _, cfg, summary = cv_run
    copy = tmp_path / "res"
    shutil.copytree(cfg.output_dir, copy, ignore=shutil.ignore_patterns("summary.*", "report.html"))
    cv = cv_reference(copy)
    assert "computed" in cv["source"]
    assert cv["auc_mean_of_folds"] == pytest.approx(summary["headline"]["auc_mean_of_folds"])
    assert cv["auc_std_of_folds"] == pytest.approx(summary["headline"]["auc_std_of_folds"])
    assert cv["auc_pooled"] == pytest.approx(summary["pooled"]["auc"])
    assert cv["auc_pooled_ci95"] == pytest.approx(summary["headline"]["auc_pooled_ci95"])


def test_predict_records_the_quality_flags_too(cv_run, cohort, tmp_path):
    _, cfg, _ = cv_run
    case = sorted(cohort.glob("*/Brats18_*"))[0]  # the one with a negative background
    out = tmp_path / "pred"
    assert main(["predict", "--runs", cfg.output_dir, "--case", str(case), "--out", str(out)]) == 0
    row = _csv(out / "predictions.csv")[0]
    assert "negative_intensities" in row["qc_flags"].split()
    meta = json.loads((out / "predictions.json").read_text())
    assert meta["predictions"][0]["qc"]["min_intensity"] == -100 and meta["qc"]["brain_fraction_range"]


def test_the_feature_distance_flags_a_far_case_and_not_a_near_one():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 16))
    ref = MemberReference.fit("m", train, rng.normal(size=(40, 16)))
    assert len(ref.scores) == 40 and "40 held-out" in ref.calibration  # enough held-out patients: no training ones
    assert ref.distance(rng.normal(size=16)) <= ref.threshold * 1.5
    assert ref.distance(np.full(16, 8.0)) > ref.threshold and ref.p_value(ref.distance(np.full(16, 8.0))) == 1 / 41
    assert 0.0 <= ref.heldout_flag_rate <= 0.2  # new draws of the training distribution: rarely flagged


def test_many_features_and_few_patients_keep_the_stated_false_positive_rate():
    """Pooled features are 512-2048 wide and a fold fits on a few dozen patients: standardizing each feature by so
    few made every new patient of the same distribution an outlier (the old rule flagged 58 % of them here)."""
    rng = np.random.default_rng(0)
    ref = MemberReference.fit("m", rng.normal(size=(16, 512)), rng.normal(size=(14, 512)))
    assert len(ref.scores) == 30 and "16 training patient(s), each left out" in ref.calibration
    new = rng.normal(size=(300, 512))  # new patients of the training distribution
    far = 1.5 * rng.normal(size=(100, 512)) + 0.5  # another distribution
    assert np.mean([ref.distance(f) > ref.threshold for f in new]) <= OOD_ALPHA * 2
    assert np.mean([ref.distance(f) > ref.threshold for f in far]) >= 0.9


def test_too_few_training_patients_are_said_so_instead_of_flagged_at_random():
    """Nine patients (the real sample): no conformal p-value can reach 5 %, so nothing is flagged (the old rule
    flagged 4 of an ensemble's own 9 training patients) and every output says why."""
    from gliograde.inference.predict import decision_text

    assert conformal_threshold(np.arange(18.0)) is None and conformal_threshold(np.arange(19.0)) == 18.0
    assert conformal_threshold(np.arange(39.0)) == 37.0  # the 2nd largest: p <= 2 / 40 above it
    rng = np.random.default_rng(1)
    members = [MemberReference.fit(f"fold_{j}", rng.normal(size=(5, 512)), rng.normal(size=(3, 512)))
               for j in range(3)]  # fmt: skip
    assert all(m.threshold is None and len(m.scores) == 8 and m.heldout_flag_rate is None for m in members)
    reference = TrainingReference(None, set(), [], members=members)
    far = [np.full((1, 512), 10.0)] * 3
    verdict = reference.ood(far)
    assert verdict["verdict"] == NOT_ENOUGH and verdict["members_above"] == 0
    assert all(v["p_value"] == pytest.approx(1 / 9) for v in verdict["per_member"].values())
    assert json.loads(json.dumps(reference.describe()))["members"][0]["threshold"] is None  # null, never NaN
    qc = {"flags": [], "ood": verdict}
    record = {"case": "c", "p_hgg": 0.3, "threshold": 0.5, "predicted_grade": "LGG", "qc": qc}
    assert decision_text(record).endswith("out of distribution? not enough training patients to judge")


def test_the_reference_is_kept_beside_the_cache_and_read_back(cv_run, synth_root):
    import torch

    from gliograde.data.brats import discover_cases
    from gliograde.data.preprocess import preprocess_case
    from gliograde.inference.predict import load_ensemble
    from gliograde.inference.qc import TrainingReference, volume_hash

    cache, cfg, _ = cv_run
    members = load_ensemble([cfg.output_dir])
    refs = []
    for _ in range(2):  # computed (or read back, when an earlier test left it), then read back
        ref = TrainingReference.of(members)
        ref.ensure_hashes()
        ref.ensure_features(members, torch.device("cpu"))
        refs.append(ref)
    files = sorted(p.name for p in (cache.path / "qc_reference").iterdir())
    assert "volumes.npz" in files and sum(f.startswith("features_") for f in files) == 3
    assert refs[0].hashes == refs[1].hashes and refs[0].fraction_range == refs[1].fraction_range
    assert [m.threshold for m in refs[0].members] == [m.threshold for m in refs[1].members]
    assert len(refs[0].ids) == 24 and len(refs[0].hashes) == 24
    case = discover_cases(synth_root).cases[5]  # a case preprocessed again hashes as its cache volume
    params = cache.manifest["params"]
    volume, _ = preprocess_case(case, params["size"], params["margin"])
    assert refs[0].hashes[volume_hash(volume)] == case.id


def test_runs_of_different_configurations_are_refused_as_predict_refuses_them(cv_run, cohort, tmp_path, capsys):
    _, cfg, _ = cv_run
    copy = tmp_path / "res"
    shutil.copytree(cfg.output_dir, copy)
    record = next((copy / "runs" / "fold_1").glob("run_*/config/config.json"))
    data = json.loads(record.read_text())
    data["config"]["lr"] = data["config"]["lr"] * 10
    record.write_text(json.dumps(data))
    out = tmp_path / "o"
    assert main(["validate", "--runs", str(copy), "--data-root", str(cohort), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different configurations" in err and not out.exists()


def test_validate_reads_the_folder_of_the_configuration_and_names_the_model(cv_run, cohort, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    """Issue 25 §1: with --preset (or --model/--depth, --config) and no --runs, the folder that configuration's cv
    wrote; the network, depth, input and preset lead the printed result, validation.md and report.html."""
    _, cfg, _ = cv_run  # a cpu-demo CV: ResNet10-3D at 16^3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ResNet10-3D").symlink_to(Path(cfg.output_dir).resolve())
    out = tmp_path / "validation"
    assert main(["validate", "--data-root", str(cohort), "--out", str(out)]) == 2  # results/ResNet50-3D: absent
    assert "results/ResNet10-3D does" in capsys.readouterr().err and not out.exists()
    assert main(["validate", "--preset", "cpu-demo", "--data-root", str(cohort), "--out", str(out)]) == 0
    line = "ResNet10-3D (depth 10, strided layout); input 4 channel(s) t1,t1ce,t2,flair at 16^3; preset cpu-demo"
    assert capsys.readouterr().out.splitlines()[0] == f"Model: {line}"
    assert (out / "validation.md").read_text().splitlines()[2] == f"**Model.** {line}."
    page = (out / "report.html").read_text()
    header = page[page.index("<header>") : page.index('<div class="banner')]
    assert "<strong>ResNet10-3D</strong>" in header and "16<sup>3</sup>" in header and "cpu-demo" in header
    record = json.loads((out / "validation.json").read_text())
    assert record["runs"] == "results/ResNet10-3D" and record["model"]["network"] == "ResNet10-3D"


def test_the_cv_figures_are_found_beside_summary_json_wherever_summarize_ran(cv_run, tmp_path):
    """summarize run as `gliograde summarize --preset cpu-demo` records its figures relative to where it ran
    (results/ResNet10-3D/...); validate, run from elsewhere, finds them beside summary.json."""
    _, cfg, _ = cv_run
    copy = tmp_path / "res"
    shutil.copytree(cfg.output_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    summary = json.loads((copy / "summary.json").read_text())
    summary["figures"] = [f"results/ResNet10-3D/{Path(f).name}" for f in summary["figures"]]
    (copy / "summary.json").write_text(json.dumps(summary))
    figures = cv_reference(copy)["figures"]
    assert [Path(f).name for f in figures] == ["cv_roc_curves.png", "cv_reliability.png"]
    assert all(Path(f).is_file() for f in figures)
