"""Your own cohort: a table of exams, any binary target, the BraTS 2021/2023 and UCSF-PDGM layouts joined with the
real published label tables (../shared/data/tables), patients with several exams, and the bad tables."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_HGG, SAMPLE_LGG

from gliograde import MODALITIES
from gliograde.cli import main
from gliograde.data.cohort import CohortSource, Columns, read_cohort
from gliograde.data.layouts import join_key
from gliograde.data.splits import make_folds
from gliograde.errors import DataError

TABLES = next((p for p in (REPO.parent / "shared" / "data" / "tables", Path("/work/shared/data/tables"))
               if (p / "UCSF-PDGM-metadata_v2.csv").is_file()), None)  # fmt: skip
REAL = SAMPLE_HGG + SAMPLE_LGG  # the BraTS layout's order: HGG/ then LGG/, each sorted
SITES = {"Brats18_2013_3_1": "2013", "Brats18_CBICA_ABM_1": "CBICA"}


def tables() -> Path:
    if TABLES is None:
        pytest.skip("the public label tables (../shared/data/tables) are not here")
    return TABLES


def grade_of(case_id: str) -> str:
    return "HGG" if case_id in SAMPLE_HGG else "LGG"


def flat_cohort(sample_root: Path, out: Path) -> Path:
    """The nine real cases as a flat folder of renamed links (P01_T1w.nii.gz ...) and a table with spelled-out
    column names (T1w, T1Gd, T2w, FLAIR; a site column with the sites the BraTS ids name)."""
    files = out / "images"
    files.mkdir(parents=True)
    rows = [["subject_id", "Site", "Grade", "T1w", "T1Gd", "T2w", "FLAIR"]]
    for n, cid in enumerate(REAL, start=1):
        pid, names = f"P{n:02d}", []
        for m, new in zip(MODALITIES, ("T1w", "T1Gd", "T2w", "FLAIR"), strict=True):
            os.symlink(sample_root / grade_of(cid) / cid / f"{cid}_{m}.nii.gz", files / f"{pid}_{new}.nii.gz")
            names.append(f"images/{pid}_{new}.nii.gz")
        rows.append([pid, SITES.get(cid, cid.split("_")[1]), grade_of(cid), *names])
    with (out / "cohort.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out / "cohort.csv"


def layout_copy(sample_root: Path, root: Path, folder, file, keys) -> list[str]:
    """The nine real cases linked into another release's naming: folder(n) -> case folder, file(case, key)."""
    ids = []
    for n, cid in enumerate(REAL):
        case = folder(n)
        d = root / case
        d.mkdir(parents=True)
        exam = case.removesuffix("_nifti")
        for m, key in zip(MODALITIES, keys, strict=True):
            os.symlink(sample_root / grade_of(cid) / cid / f"{cid}_{m}.nii.gz", d / file(exam, key))
        ids.append(exam)
    return ids


# ------------------------------------------------------------------------------------- the same cases, two ways
@pytest.fixture(scope="module")
def flat_prepared(sample_root, tmp_path_factory) -> tuple[Path, Path]:
    """The nine real cases as a flat table, prepared at 16^3 in 2 folds from the table (c-table) and from their BraTS
    folder (c-brats), once for the tests of both: (folder, table)."""
    tmp = tmp_path_factory.mktemp("flat")
    table = flat_cohort(sample_root, tmp / "flat")
    common = ["--size", "16", "--folds", "2", "--workers", "1"]
    main(["prepare", "--cohort", str(table), "--out", str(tmp / "c-table"), *common])
    main(["prepare", "--data-root", str(sample_root), "--out", str(tmp / "c-brats"), *common])
    return tmp, table


def test_flat_table_gives_the_brats_layouts_cases_sites_and_folds(flat_prepared):
    tmp_path, table = flat_prepared
    found = read_cohort(table)
    assert [c.id for c in found.cases] == [f"P{n:02d}" for n in range(1, 10)]
    assert [c.grade for c in found.cases] == [grade_of(c) for c in REAL]
    assert found.target.classes == ("LGG", "HGG") and found.target.column == "grade"
    assert [c.site for c in found.cases] == [SITES.get(c, c.split("_")[1]) for c in REAL]
    assert found.cases[0].paths["t1ce"].name == "P01_T1Gd.nii.gz"

    by_table = json.loads((tmp_path / "c-table" / "folds.json").read_text())
    by_layout = json.loads((tmp_path / "c-brats" / "folds.json").read_text())
    rename = {f"P{n:02d}": cid for n, cid in enumerate(REAL, start=1)}
    for a, b in zip(by_table["repeat_sets"][0]["folds"], by_layout["repeat_sets"][0]["folds"], strict=True):
        for key in ("train", "val", "fit", "select"):
            assert [rename[i] for i in a[key]] == b[key]
    a = np.load(tmp_path / "c-table" / "volumes.npy")
    b = np.load(tmp_path / "c-brats" / "volumes.npy")
    assert np.array_equal(a, b)  # the same images, preprocessed the same way


@pytest.mark.slow
def test_flat_table_trains_summarizes_and_validates_as_the_brats_layout(flat_prepared, sample_root, synth_root,
                                                                        tmp_path):  # fmt: skip
    """A tiny CV through the table and through the BraTS layout (each on what `prepare` made of it), same seed: the
    same numbers; and the ensemble validated on a cohort given as a folder and as a table: the same predictions."""
    caches, table = flat_prepared
    common = ["--preset", "cpu-demo", "--size", "16", "--epochs", "1", "--min-epochs", "1", "--num-workers", "0",
              "--device", "cpu", "--no-tensorboard"]  # fmt: skip
    assert main(["cv", "--cohort", str(table), "--output-dir", str(tmp_path / "r-table"),
                 "--cache-dir", str(caches / "c-table"), *common]) in (0, None)  # fmt: skip
    assert main(["cv", "--data-root", str(sample_root), "--output-dir", str(tmp_path / "r-brats"),
                 "--cache-dir", str(caches / "c-brats"), *common]) in (0, None)  # fmt: skip
    s_table = json.loads((tmp_path / "r-table" / "summary.json").read_text())
    s_brats = json.loads((tmp_path / "r-brats" / "summary.json").read_text())
    for key in ("auc", "sensitivity", "specificity", "f1", "accuracy"):
        assert s_table["pooled"][key] == pytest.approx(s_brats["pooled"][key], abs=1e-6, nan_ok=True)
    assert [r["auc"] for r in s_table["folds"]] == pytest.approx([r["auc"] for r in s_brats["folds"]], nan_ok=True)
    assert s_table["sites"]["sites"] == s_brats["sites"]["sites"]  # the table's site column = the ids' sites

    # validate the BraTS-layout ensemble on 8 phantoms: as their folder, and as a table of the same files
    phantoms = tmp_path / "phantoms"
    rows = [["id", "grade", "t1", "t1ce", "t2", "flair"]]
    for case in sorted(synth_root.glob("[HL]GG/*"))[:4] + sorted(synth_root.glob("LGG/*"))[:4]:
        shutil.copytree(case, phantoms / case.parent.name / case.name, dirs_exist_ok=True)
        rows.append([case.name, case.parent.name,
                     *(f"{case.parent.name}/{case.name}/{case.name}_{m}.nii.gz" for m in MODALITIES)])  # fmt: skip
    with (phantoms / "cohort.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    results = str(tmp_path / "r-brats")
    main(["validate", "--runs", results, "--data-root", str(phantoms), "--out", str(tmp_path / "v-folder")])
    main(["validate", "--runs", results, "--cohort", str(phantoms / "cohort.csv"), "--out", str(tmp_path / "v-table")])
    v_folder = json.loads((tmp_path / "v-folder" / "validation.json").read_text())
    v_table = json.loads((tmp_path / "v-table" / "validation.json").read_text())
    assert v_table["metrics"]["auc"] == pytest.approx(v_folder["metrics"]["auc"], nan_ok=True)
    p_folder = {r["case"]: r["p_hgg"] for r in v_folder["predictions"]}
    assert {r["case"]: r["p_hgg"] for r in v_table["predictions"]} == pytest.approx(p_folder)


# ------------------------------------------------------------------------------------------------ the layouts
def test_the_new_layouts_are_found_and_joined_with_the_published_tables(sample_root, tmp_path, capsys):
    t = tables()
    ucsf_numbers = [4, 5, 7, 8, 9, 10, 11, 12, 13]
    layouts = {
        "b21": (lambda n: f"BraTS2021_{n:05d}", lambda e, k: f"{e}_{k}.nii.gz", ("t1", "t1ce", "t2", "flair")),
        "b23": (lambda n: f"BraTS-GLI-{n:05d}-000", lambda e, k: f"{e}-{k}.nii.gz", ("t1n", "t1c", "t2w", "t2f")),
        "ucsf": (lambda n: f"UCSF-PDGM-{ucsf_numbers[n]:04d}_nifti", lambda e, k: f"{e}_{k}.nii.gz",
                 ("T1", "T1c", "T2", "FLAIR")),
    }  # fmt: skip
    for name, (folder, file, keys) in layouts.items():
        ids = layout_copy(sample_root, tmp_path / name, folder, file, keys)
        found = CohortSource(tmp_path / name).discover(labelled=False)
        assert sorted(c.id for c in found.cases) == sorted(ids), name
    # labels: the crosswalk onto BraTS 2021 and onto BraTS 2023 (the same ids), the UCSF metadata's 3-digit ids
    main(["cohort", str(tmp_path / "b23"), "--out", str(tmp_path / "b23.csv"),
          "--labels", str(t / "BraTS2021_MappingToTCIA.csv"), "--join", "BraTS2021 ID"])  # fmt: skip
    said = capsys.readouterr().out
    crosswalk = {r["BraTS2021 ID"] for r in csv.DictReader((t / "BraTS2021_MappingToTCIA.csv").open())}
    matched = sum(f"BraTS2021_{n:05d}" in crosswalk for n in range(9))
    assert f"{matched} of 9 case(s) matched a row" in said
    rows = list(csv.DictReader((tmp_path / "b23.csv").open()))
    assert rows[0]["id"] == "BraTS-GLI-00000-000" and rows[0]["patient"] == "BraTS-GLI-00000"
    assert rows[0]["MGMT value"] != "" and rows[0]["t1"] == "b23/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz"

    main(["cohort", str(tmp_path / "ucsf"), "--out", str(tmp_path / "ucsf.tsv"),
          "--labels", str(t / "UCSF-PDGM-metadata_v2.csv")])  # fmt: skip
    assert "9 of 9 case(s) matched a row" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "ucsf.tsv").open(), delimiter="\t"))
    meta = {r["ID"]: r for r in csv.DictReader((t / "UCSF-PDGM-metadata_v2.csv").open())}
    for r in rows:  # UCSF-PDGM-0004 took the row of UCSF-PDGM-004
        three = f"UCSF-PDGM-{int(r['id'].rsplit('-', 1)[1]):03d}"
        assert r["IDH"] == meta[three]["IDH"] and r["WHO CNS Grade"] == meta[three]["WHO CNS Grade"]
        assert r["site"] == "UCSF"
    assert join_key("UCSF-PDGM-004") == join_key("UCSF-PDGM-0004_FU016d") == join_key("UCSF-PDGM-0004_nifti")
    assert join_key("BraTS2021_00042") == join_key("BraTS-GLI-00042-001")


def test_a_folder_without_labels_says_how_to_write_a_table(sample_root, tmp_path):
    layout_copy(sample_root, tmp_path / "b21", lambda n: f"BraTS2021_{n:05d}", lambda e, k: f"{e}_{k}.nii.gz",
                ("t1", "t1ce", "t2", "flair"))  # fmt: skip
    with pytest.raises(DataError, match=r"BraTS 2021 case folders, which carry no labels.*gliograde cohort"):
        CohortSource(tmp_path / "b21").discover()


# ----------------------------------------------------------------------------------------------- patients
def test_a_follow_up_exam_lands_in_its_patients_fold_and_inner_part():
    ids = [f"S{i:02d}" for i in range(30)] + ["S03_FU1", "S17_FU1", "S17_FU2"]
    patients = [i.split("_")[0] for i in ids]
    labels = [i % 3 == 0 for i in range(30)] + [True, False, False]
    folds = make_folds(ids, np.array(labels, int), 3, 42, patients=patients, sites=["unknown"] * len(ids))
    assert sorted(folds["case_ids"]) == sorted(ids)
    assert folds["patients"] == {"S03": ["S03", "S03_FU1"], "S17": ["S17", "S17_FU1", "S17_FU2"]}
    for entry in folds["repeat_sets"][0]["folds"]:
        for key in ("val", "fit", "select"):
            part = set(entry[key])
            for patient, exams in folds["patients"].items():
                assert part.isdisjoint(exams) or part.issuperset(exams), (key, patient)
    # without follow-ups: the split of the exams themselves, unchanged
    plain = make_folds(ids[:30], np.array(labels[:30], int), 3, 42, sites=["unknown"] * 30)
    assert make_folds(ids[:30], np.array(labels[:30], int), 3, 42, patients=ids[:30],
                      sites=["unknown"] * 30) == plain  # fmt: skip


def test_exams_of_one_patient_with_different_labels_are_refused():
    with pytest.raises(DataError, match="patient S1: its exams"):
        make_folds(["S1", "S1b", "S2", "S3"], np.array([1, 0, 0, 1]), 2, 0, patients=["S1", "S1", "S2", "S3"])


# ------------------------------------------------------------------------------------------------ bad tables
def _table(tmp_path: Path, sample_root: Path, rows: list[list[str]], head=None, name="t.csv") -> Path:
    head = head or ["id", "label", "t1", "t1ce", "t2", "flair"]
    path = tmp_path / name
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    return path


def _files(sample_root: Path, cid: str) -> list[str]:
    return [str(sample_root / grade_of(cid) / cid / f"{cid}_{m}.nii.gz") for m in MODALITIES]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("duplicate", r"line 3: id 'A' already on line 2 \(duplicated id\)"),
        ("missing", r"line 3 \(B\): column 't2': .*does not exist"),
        ("many_values", r"column 'label' holds 3 values \(a, b, c\); choose the positive class with --positive"),
        ("one_class", r"column 'label' holds only 'HGG' once the empty cells are left out: a binary target needs two"),
        ("no_modality", r"no column for modality flair \(one of flair/t2f/t2flair\)"),
        ("empty", r"cohort table .* is empty"),
        ("header_only", r"has a header but no rows"),
        ("latin1", r"is not UTF-8 \(byte \d+: b'\\xe9'\); save it as UTF-8"),
    ],
)
def test_a_bad_table_is_one_line_naming_the_row_or_column_and_nothing_is_written(sample_root, tmp_path, capsys,
                                                                                   case, message):  # fmt: skip
    a, b = _files(sample_root, REAL[0]), _files(sample_root, REAL[5])
    if case == "duplicate":
        path = _table(tmp_path, sample_root, [["A", "HGG", *a], ["A", "LGG", *b]])
    elif case == "missing":
        b[2] = str(tmp_path / "gone_t2.nii.gz")
        path = _table(tmp_path, sample_root, [["A", "HGG", *a], ["B", "LGG", *b]])
    elif case == "many_values":
        path = _table(tmp_path, sample_root, [["A", "a", *a], ["B", "b", *b], ["C", "c", *a]])
    elif case == "one_class":
        path = _table(tmp_path, sample_root, [["A", "HGG", *a], ["B", "", *b]])
    elif case == "no_modality":
        path = _table(tmp_path, sample_root, [["A", "HGG", *a[:3]]], ["id", "label", "t1", "t1ce", "t2"])
    elif case == "empty":
        path = tmp_path / "t.csv"
        path.write_text("")
    elif case == "header_only":
        path = _table(tmp_path, sample_root, [])
    else:
        path = tmp_path / "t.csv"
        path.write_bytes("id,label,t1,t1ce,t2,flair\nRené,HGG,a,b,c,d\n".encode("latin-1"))
    out = tmp_path / "cache"
    assert main(["prepare", "--cohort", str(path), "--size", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_target_and_positive_choose_the_question_and_exclude_what_is_neither(tmp_path, sample_root):
    rows = [[f"C{i}", value, *_files(sample_root, REAL[i])] for i, value in
            enumerate(["wildtype", "mutant", "", "wildtype", "NOS", "mutant"])]  # fmt: skip
    path = _table(tmp_path, sample_root, rows, ["id", "IDH", "t1", "t1ce", "t2", "flair"])
    found = read_cohort(path, Columns(label="IDH"), positive="wildtype", negative="mutant")
    assert found.target.classes == ("IDH mutant", "IDH wildtype")
    assert [c.id for c in found.cases] == ["C0", "C1", "C3", "C5"]
    assert found.ungraded == ["C2", "C4"]  # empty, and neither value: excluded, counted
    assert "excluded 2 case(s) without a IDH mutant or IDH wildtype label in column 'IDH'" in found.report()
    everything_else = read_cohort(path, Columns(label="IDH"), positive="wildtype")
    assert everything_else.target.classes == ("IDH mutant/NOS", "IDH wildtype")  # the other values, named
    assert len(everything_else.cases) == 5
    with pytest.raises(DataError, match="--positive 'wild' does not occur in column 'IDH'"):
        read_cohort(path, Columns(label="IDH"), positive="wild")


# ------------------------------------------------------------------------------------- a question of its own
@pytest.fixture(scope="module")
def idh_cv(tmp_path_factory):
    """A tiny 3-fold CV asked --target IDH --positive positive of a synthetic cohort table, and a second synthetic
    cohort (other ids) to validate on."""
    from gliograde.data.synthetic import synthesize

    tmp = tmp_path_factory.mktemp("idh")
    train, _ = synthesize(tmp / "train", 24, (48, 48, 40), seed=7, workers=1, progress=False, target="IDH")
    new, _ = synthesize(tmp / "new", 12, (48, 48, 40), seed=8, workers=1, progress=False, first_index=100,
                        target="IDH")  # fmt: skip
    results = tmp / "results"
    rc = main(["cv", "--preset", "cpu-demo", "--cohort", str(train / "cohort.csv"), "--target", "IDH", "--positive",
               "positive", "--size", "16", "--epochs", "2", "--min-epochs", "2", "--folds", "3", "--num-workers",
               "0", "--device", "cpu", "--no-tensorboard", "--output-dir", str(results), "--cache-dir",
               str(tmp / "cache")])  # fmt: skip
    assert rc in (0, None)
    return train, new, results


@pytest.mark.slow
def test_every_output_of_a_non_grade_question_carries_its_class_names(idh_cv, tmp_path, capsys):
    train, new, results = idh_cv
    summary = json.loads((results / "summary.json").read_text())
    assert summary["classes"] == ["IDH negative", "IDH positive"]
    assert set(summary["pooled"]["per_class"]) == {"IDH negative", "IDH positive"}
    md = (results / "summary.md").read_text()
    assert "| IDH positive/IDH negative |" in md and "sensitivity (IDH positive)" in md
    html = (results / "report.html").read_text()
    assert "IDH positive vs IDH negative" in html and "Predicted IDH negative" in html
    for text in (md, re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)):  # the figures' bytes aside
        assert "HGG" not in text.replace(str(train), "") and "LGG" not in text.replace(str(train), "")
    run = next(results.glob("runs/fold_0/run_*"))
    assert json.loads((run / "metrics" / "metrics.json").read_text())["final"]["classes"] == summary["classes"]

    capsys.readouterr()
    main(["predict", "--runs", str(results), "--cohort", str(new / "cohort.csv"), "--target", "IDH",
          "--out", str(tmp_path / "pred")])  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert {r["positive_class"] for r in rows} == {"IDH positive"}
    assert {r["predicted_class"] for r in rows} <= {"IDH positive", "IDH negative"}
    assert all(r["true_class"] in ("IDH positive", "IDH negative") for r in rows)
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert records["classes"] == summary["classes"] and records["predictions"][0]["classes"] == summary["classes"]

    main(["validate", "--runs", str(results), "--cohort", str(new / "cohort.csv"), "--target", "IDH",
          "--positive", "positive", "--out", str(tmp_path / "val")])  # fmt: skip
    val = (tmp_path / "val" / "validation.md").read_text()
    assert "P(IDH positive)" in val and "IDH negative" in val and "HGG" not in val.replace(str(new), "")
    assert "IDH positive" in capsys.readouterr().out


@pytest.mark.slow
def test_a_validation_cohort_asked_another_question_or_holding_a_training_patient_is_refused(idh_cv, tmp_path,
                                                                                            capsys):  # fmt: skip
    train, new, results = idh_cv
    assert main(["validate", "--runs", str(results), "--data-root", str(new), "--out", str(tmp_path / "v1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the runs answer IDH positive vs IDH negative, the cohort's labels HGG vs LGG ('grade')" in err
    assert not (tmp_path / "v1").exists()
    # a follow-up exam of a training patient: the leakage check counts patients
    rows = list(csv.DictReader((new / "cohort.csv").open()))
    trained = json.loads(next(results.glob("runs/fold_0/run_*/config/config.json")).read_text())
    patient = next(iter((trained.get("split") or {}).get("fit") or [])) if trained.get("split") else None
    patient = patient or next(csv.DictReader((train / "cohort.csv").open()))["id"]
    follow_up = {**rows[0], "id": f"{patient}_FU1", "patient": patient}
    for m in MODALITIES:
        follow_up[m] = str(new / rows[0][m])
    table = tmp_path / "with_follow_up.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, **{m: str(new / r[m]) for m in MODALITIES}} for r in rows[1:]] + [follow_up])
    assert main(["validate", "--runs", str(results), "--cohort", str(table), "--target", "IDH", "--positive",
                 "positive", "--out", str(tmp_path / "v2")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "shares 1 patient(s) with the training folds" in err and f"by patient id {patient}" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "v2").exists()  # only the overlap list, beside it


def test_ucsf_bias_corrected_files_only_when_asked(sample_root, tmp_path):
    ids = layout_copy(sample_root, tmp_path / "ucsf", lambda n: f"UCSF-PDGM-{n + 4:04d}_nifti",
                      lambda e, k: f"{e}_{k}.nii.gz", ("T1", "T1c", "T2", "FLAIR"))  # fmt: skip
    folder = tmp_path / "ucsf" / f"{ids[0]}_nifti"
    os.symlink(folder / f"{ids[0]}_T2.nii.gz", folder / f"{ids[0]}_T2_bias.nii.gz")
    plain = {c.id: c for c in CohortSource(tmp_path / "ucsf").cases_to_predict()}
    assert plain[ids[0]].paths["t2"].name == f"{ids[0]}_T2.nii.gz"
    biased = {c.id: c for c in CohortSource(tmp_path / "ucsf", bias=True).cases_to_predict()}
    assert biased[ids[0]].paths["t2"].name == f"{ids[0]}_T2_bias.nii.gz"
    assert biased[ids[1]].paths["t2"].name == f"{ids[1]}_T2.nii.gz"  # no _bias file: the plain one


def test_a_cohort_question_gets_its_own_results_folder_and_cache():
    from gliograde.config import resolve

    assert resolve("final").output_dir == "results/ResNet50-3D"  # the seeds' folder, unchanged
    assert resolve("final", target="IDH", positive="wildtype").output_dir == "results/ResNet50-3D-IDH"
    assert resolve("cpu-demo", target="WHO CNS Grade", positive="4").output_dir == "results/ResNet10-3D-WHO-CNS-Grade"
    assert resolve("final", target="grade").output_dir == "results/ResNet50-3D"
