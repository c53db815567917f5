"""Case discovery on the real BraTS 2018 sample, in the 2018 and (rebuilt) 2020 layouts, and its bad inputs."""

from __future__ import annotations

import csv
import shutil

import pytest
from conftest import SAMPLE_HGG, SAMPLE_LGG, copy_case

from gliograde import MODALITIES
from gliograde.data.brats import discover_cases, site_of
from gliograde.errors import DataError


def test_discovers_the_nine_real_cases(sample_root):
    found = discover_cases(sample_root)
    assert [c.id for c in found.cases] == SAMPLE_HGG + SAMPLE_LGG
    assert [c.grade for c in found.cases] == ["HGG"] * 5 + ["LGG"] * 4
    assert [c.label for c in found.cases] == [1] * 5 + [0] * 4
    assert [c.site for c in found.cases] == [
        "2013",
        "CBICA",
        "TCIA01",
        "TCIA02",
        "TCIA03",
        "TCIA10",
        "TCIA10",
        "TCIA10",
        "TCIA13",
    ]
    for case in found.cases:
        assert set(case.paths) == set(MODALITIES)
        for m, p in case.paths.items():
            assert p.name == f"{case.id}_{m}.nii.gz" and p.is_file()
        assert case.seg is not None and case.seg.name == f"{case.id}_seg.nii.gz"
    assert "2018/2019" in found.layout
    assert "9 cases (5 HGG, 4 LGG)" in found.report()


def test_site_parsing():
    assert site_of("Brats18_2013_3_1") == "2013"
    assert site_of("BraTS19_TMC_06290_1") == "TMC"
    assert site_of("Brats17_CBICA_AAB_1") == "CBICA"
    assert site_of("BraTS20_Training_001") == "unknown"


def test_a_raw_tcga_barcode_names_its_tissue_source_site():
    # TCGA barcodes: TCGA-<tissue source site>-<participant>; the TSS code is the site (GDC's code tables)
    assert site_of("TCGA-DU-7294") == "TCGA-DU"
    assert site_of("TCGA-02-0006") == "TCGA-02"
    assert site_of("tcga-hw-7486") == "TCGA-HW"
    assert site_of("TCGA_DU_7294") == "unknown" and site_of("patient_007") == "unknown"  # not a barcode


def _mapping_rows(sample_root):
    with (sample_root / "name_mapping_brats2019.csv").open(newline="") as f:
        return {r["BraTS_2018_subject_ID"]: r for r in csv.DictReader(f)}


def test_2020_flat_layout_with_name_mapping(sample_root, tmp_path):
    rows = _mapping_rows(sample_root)
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    root.mkdir()
    mapping = [
        [
            "Grade",
            "BraTS_2017_subject_ID",
            "BraTS_2018_subject_ID",
            "TCGA_TCIA_subject_ID",
            "BraTS_2019_subject_ID",
            "BraTS_2020_subject_ID",
        ]
    ]
    for i, cid in enumerate(SAMPLE_HGG + SAMPLE_LGG, start=1):
        new = f"BraTS20_Training_{i:03d}"
        grade = "HGG" if cid in SAMPLE_HGG else "LGG"
        (root / new).mkdir()
        for m in (*MODALITIES, "seg"):
            (root / new / f"{new}_{m}.nii.gz").symlink_to(sample_root / grade / cid / f"{cid}_{m}.nii.gz")
        r = rows[cid]
        mapping.append(
            [
                r["Grade"],
                r["BraTS_2017_subject_ID"],
                cid,
                r["TCGA_TCIA_subject_ID"],
                r["BraTS_2019_subject_ID"],
                new,
            ]
        )
    # a folder the mapping gives no grade for: excluded and counted, not an error
    (root / "BraTS20_Training_099").mkdir()
    with (root / "name_mapping.csv").open("w", newline="") as f:
        csv.writer(f).writerows(mapping)

    found = discover_cases(root)
    assert [c.id for c in found.cases] == [f"BraTS20_Training_{i:03d}" for i in range(1, 10)]
    assert [c.grade for c in found.cases] == ["HGG"] * 5 + ["LGG"] * 4
    assert found.cases[0].site == "2013" and found.cases[1].site == "CBICA" and found.cases[8].site == "TCIA13"
    assert found.ungraded == ["BraTS20_Training_099"]
    assert "2020" in found.layout and "without a grade" in found.report()


def test_uncompressed_nii_is_found(tmp_path):
    import nibabel as nib

    from gliograde.data.synthetic import synthesize

    src, _ = synthesize(tmp_path / "s", 2, (24, 24, 20), seed=1, workers=1, progress=False)
    for f in list(src.rglob("*.nii.gz")):
        nib.save(nib.load(f), str(f).removesuffix(".gz"))
        f.unlink()
    found = discover_cases(src)
    assert len(found.cases) == 2 and all(p.suffix == ".nii" for c in found.cases for p in c.files)


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*gliograde demo"):
        discover_cases(tmp_path / "nowhere")


def test_empty_root_says_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"no BraTS cases found .*HGG/<case>.*gliograde demo"):
        discover_cases(tmp_path)


def test_flat_folders_without_mapping_are_refused(tmp_path):
    (tmp_path / "case_a").mkdir()
    with pytest.raises(DataError, match=r"name_mapping\.csv"):
        discover_cases(tmp_path)


def test_incomplete_case_is_named_or_skipped(sample_root, tmp_path):
    copy_case(sample_root, "Brats18_2013_3_1", tmp_path)
    broken = copy_case(sample_root, "Brats18_TCIA10_628_1", tmp_path)
    (broken / "Brats18_TCIA10_628_1_t2.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Brats18_TCIA10_628_1 .*incomplete.*Brats18_TCIA10_628_1_t2.nii.gz"):
        discover_cases(tmp_path)
    found = discover_cases(tmp_path, skip_incomplete=True)
    assert [c.id for c in found.cases] == ["Brats18_2013_3_1"]
    assert "Brats18_TCIA10_628_1" in found.skipped and "t2" in found.report()


def test_duplicate_case_id_is_an_error(sample_root, tmp_path):
    copy_case(sample_root, "Brats18_2013_3_1", tmp_path)
    shutil.copytree(tmp_path / "HGG" / "Brats18_2013_3_1", tmp_path / "LGG" / "Brats18_2013_3_1")
    with pytest.raises(DataError, match="Brats18_2013_3_1 found twice"):
        discover_cases(tmp_path)


def test_the_2020_mapping_falls_back_on_the_tcga_barcode(tmp_path):
    from gliograde.data.brats import _read_mapping

    path = tmp_path / "name_mapping.csv"
    rows = [
        ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID", "BraTS_2019_subject_ID",
         "BraTS_2020_subject_ID"],
        ["HGG", "NA", "NA", "TCGA-DU-7294", "NA", "BraTS20_Training_001"],  # new in 2020, TCGA case
        ["LGG", "NA", "Brats18_2013_0_1", "NA", "BraTS19_2013_0_1", "BraTS20_Training_002"],
        ["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_003"],  # no id says where it was scanned
    ]  # fmt: skip
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert _read_mapping(path) == {
        "BraTS20_Training_001": ("HGG", "TCGA-DU"),
        "BraTS20_Training_002": ("LGG", "2013"),
        "BraTS20_Training_003": ("HGG", "unknown"),
    }


# ----------------------------------------------------------------------------------- files checked while scanning
def _renamed_case(sample_root, case_id: str, dst):
    """A real case copied to dst/<new id>/ with its files renamed (a case folder to predict)."""
    src = copy_case(sample_root, case_id, dst / "_src")
    target = dst / "CaseMismatch"
    shutil.copytree(src, target)
    for f in target.iterdir():
        f.rename(target / f.name.replace(case_id, "CaseMismatch"))
    shutil.rmtree(dst / "_src")
    return target


def test_a_case_on_two_grids_is_named_once_in_one_line_before_predict_writes_anything(sample_root, tmp_path, capsys):
    """Issue 25 §3: such a case printed 'case CaseMismatch: case CaseMismatch: ...' with both affines, twice, and
    left an --out folder holding an empty CSV. Now the scan names the case, the two files and what differs."""
    import nibabel as nib
    import numpy as np

    from gliograde.cli import main
    from gliograde.data.brats import read_case_folder

    folder = _renamed_case(sample_root, "Brats18_2013_3_1", tmp_path)
    t1ce = folder / "CaseMismatch_t1ce.nii.gz"
    img = nib.load(t1ce)
    affine = img.affine.copy()
    affine[0, 3] += 5.0  # the same voxels, 5 mm to the side
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), str(t1ce))
    with pytest.raises(DataError) as err:
        read_case_folder(folder)
    text = str(err.value)
    assert "CaseMismatch_t1ce.nii.gz and CaseMismatch_t1.nii.gz are not on one voxel grid (origin 5 mm apart)" in text
    assert text.count("case ") == 1 and "[[" not in text

    out = tmp_path / "predictions"
    assert main(["predict", "--case", str(folder), "--runs", str(tmp_path / "no_runs"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "origin 5 mm apart" in lines[0] and lines[0].count("CaseMismatch_t1ce") == 1
    assert not out.exists()  # a re-run can use the same --out


def test_the_scan_reads_each_header_once_a_process(sample_root, monkeypatch):
    """Headers are read once per file version (path, size, mtime): a re-scan (prepare after the plan) is cheap."""
    import gliograde.data.brats as brats

    discover_cases(sample_root)
    calls = []
    monkeypatch.setattr(brats, "_read_header", lambda *a: calls.append(a) or pytest.fail("header read again"))
    assert len(discover_cases(sample_root).cases) == 9 and calls == []


def test_grid_differences_are_said_in_a_few_words():
    import numpy as np

    from gliograde.data.brats import grid_difference

    eye = np.eye(4)
    assert grid_difference((4, 4, 4), eye, (4, 4, 4), eye + 1e-5) is None
    assert grid_difference((4, 4, 5), eye, (4, 4, 4), eye) == "shape 4 x 4 x 5 vs 4 x 4 x 4"
    assert (
        grid_difference((4, 4, 4), np.diag([1, 1, 1.5, 1]), (4, 4, 4), eye) == "voxel size 1 x 1 x 1.5 vs 1 x 1 x 1 mm"
    )
    assert grid_difference((4, 4, 4), np.diag([-1, 1, 1, 1]), (4, 4, 4), eye) == "orientation LAS vs RAS"
    shifted = eye.copy()
    shifted[:3, 3] = [3, 4, 0]
    assert grid_difference((4, 4, 4), shifted, (4, 4, 4), eye) == "origin 5 mm apart"
