"""Synthetic BraTS-like sets: real NIfTI in the BraTS layout, deterministic, grade-dependent appearance."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from gliograde import MODALITIES
from gliograde.data.brats import discover_cases
from gliograde.data.synthetic import brats_affine, synth_case, synthesize
from gliograde.errors import DataError


def test_layout_dtypes_affine_and_labels(synth_root):
    found = discover_cases(synth_root)
    assert len(found.cases) == 24
    assert sum(c.grade == "HGG" for c in found.cases) == round(24 * 210 / 285)
    for case in found.cases:
        assert case.paths["t1"].parent == synth_root / case.grade / case.id
        img = nib.load(case.paths["flair"])
        assert img.get_data_dtype() == np.int16 and img.shape == (48, 48, 40)
        assert np.allclose(img.affine, brats_affine((48, 48, 40)))
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        seg = np.asarray(nib.load(case.seg).dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
        brain = np.asarray(img.dataobj) > 0
        assert 0.05 < brain.mean() < 0.6 and not (seg[~brain] > 0).any()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a, _ = synthesize(tmp_path / "a", 3, (24, 24, 20), seed=5, workers=1, progress=False)
    b, _ = synthesize(tmp_path / "b", 3, (24, 24, 20), seed=5, workers=2, progress=False)
    c, _ = synthesize(tmp_path / "c", 3, (24, 24, 20), seed=6, workers=1, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    for f in files:
        assert np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(b / f).dataobj))
    t1 = sorted(a.rglob("*_t1.nii.gz"))[0].relative_to(a)
    if (c / t1).exists():
        assert not np.array_equal(np.asarray(nib.load(a / t1).dataobj), np.asarray(nib.load(c / t1).dataobj))


def test_existing_folder_is_reused_or_refused(tmp_path):
    out, reused = synthesize(tmp_path / "s", 2, (24, 24, 20), seed=1, workers=1, progress=False)
    assert not reused
    assert synthesize(out, 2, (24, 24, 20), seed=1, workers=1, progress=False) == (out, True)
    with pytest.raises(DataError, match="not empty"):
        synthesize(out, 3, (24, 24, 20), seed=1, workers=1, progress=False)


def test_grades_look_different_on_t1ce_and_flair():
    """HGG: more enhancing tumour (label 4) and wider edema than LGG, on average; yet the ranges overlap."""
    stats = {"HGG": [], "LGG": []}
    for i in range(16):
        grade = "HGG" if i % 2 else "LGG"
        _, seg = synth_case(grade, (48, 48, 40), np.random.SeedSequence([3, i]))
        tumour = max(int((seg > 0).sum()), 1)
        stats[grade].append(((seg == 4).sum() / tumour, (seg == 2).sum() / tumour))
    hgg, lgg = np.array(stats["HGG"]), np.array(stats["LGG"])
    assert hgg[:, 0].mean() > 3 * lgg[:, 0].mean()  # enhancement
    assert hgg[:, 1].mean() > lgg[:, 1].mean()  # edema share
    assert set(MODALITIES) == {"t1", "t1ce", "t2", "flair"}
