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


# ------------------------------------------------------------------ sets whose answer is known (signal=...)
def _t1ce_tumour_ratio(case) -> float:
    """90th percentile of T1ce in the tumour over the median T1ce of normal brain: high where a rim enhances."""
    t1ce = np.asarray(nib.load(case.paths["t1ce"]).dataobj, dtype=np.float64)
    seg = np.asarray(nib.load(case.seg).dataobj)
    tumour, normal = seg > 0, (t1ce > 0) & (seg == 0)
    return float(np.percentile(t1ce[tumour], 90) / np.median(t1ce[normal])) if tumour.any() else 0.0


def test_default_signal_keeps_the_record_and_other_signals_are_refused_on_it(tmp_path):
    import json

    out, _ = synthesize(tmp_path / "s", 2, (24, 24, 20), seed=1, workers=1, progress=False)
    record = json.loads((out / "synth.json").read_text())
    assert record == {"cases": 2, "shape": [24, 24, 20], "seed": 1, "hgg_fraction": 210 / 285, "version": 1}
    assert synthesize(out, 2, (24, 24, 20), seed=1, workers=1, progress=False, signal="grade") == (out, True)
    with pytest.raises(DataError, match="not empty"):
        synthesize(out, 2, (24, 24, 20), seed=1, workers=1, progress=False, signal="none")
    other, _ = synthesize(tmp_path / "n", 2, (24, 24, 20), seed=1, workers=1, progress=False, signal="none")
    assert json.loads((other / "synth.json").read_text()) == {**record, "signal": "none"}
    assert synthesize(other, 2, (24, 24, 20), seed=1, workers=1, progress=False, signal="none") == (other, True)
    with pytest.raises(DataError, match="not empty"):
        synthesize(other, 2, (24, 24, 20), seed=1, workers=1, progress=False)
    with pytest.raises(DataError, match="signal"):
        synthesize(tmp_path / "x", 2, (24, 24, 20), seed=1, workers=1, progress=False, signal="tumour")


def test_signal_none_keeps_ids_and_labels_but_not_the_look(tmp_path):
    """The T1ce rim statistic separates the grades under "grade" and follows the drawn look, not the label, under
    "none"; ids, folders and the HGG share are those of "grade"."""
    from sklearn.metrics import roc_auc_score

    from gliograde.data.synthetic import synthetic_plan

    kw = dict(n_cases=40, shape=(32, 32, 24), seed=11, hgg_fraction=0.5, workers=1, progress=False)
    auc = {}
    for signal in ("grade", "none"):
        out, _ = synthesize(tmp_path / signal, signal=signal, **kw)
        cases = discover_cases(out).cases
        look = {cid: g for cid, _, g in synthetic_plan(40, 0.5, 11, signal=signal)}
        stat = [_t1ce_tumour_ratio(c) for c in cases]
        auc[signal] = roc_auc_score([c.label for c in cases], stat)
        auc[signal + "_look"] = roc_auc_score([look[c.id] == "HGG" for c in cases], stat)
        auc[signal + "_cases"] = sorted((c.id, c.grade) for c in cases)
    assert auc["grade_cases"] == auc["none_cases"]
    assert auc["grade"] > 0.9 and auc["none_look"] > 0.9
    assert abs(auc["none"] - 0.5) < 0.2


def test_signal_none_look_is_independent_of_the_label():
    from gliograde.data.synthetic import synthetic_plan

    plan = synthetic_plan(4000, 0.5, 3, signal="none")
    look = np.array([g == "HGG" for _, _, g in plan])
    label = np.array([g == "HGG" for _, g, _ in plan])
    assert look.sum() == label.sum() == 2000
    assert abs(look[label].mean() - look[~label].mean()) < 0.05
    assert all(lab == lk for _, lab, lk in synthetic_plan(50, 0.5, 3))  # "grade": the look is the label


def test_signal_site_sites_are_single_grade_and_recoverable(tmp_path):
    from collections import defaultdict

    from gliograde.data.brats import site_of
    from gliograde.data.synthetic import SITE_SIGNAL_SITES, synthetic_plan

    out, _ = synthesize(tmp_path / "s", 30, (24, 24, 20), seed=4, workers=1, progress=False, signal="site")
    cases = discover_cases(out).cases
    grades = defaultdict(set)
    for case in cases:
        assert case.site == site_of(case.id)
        grades[case.site].add(case.grade)
    assert all(len(g) == 1 for g in grades.values())
    assert "2013" not in grades
    for grade, names in SITE_SIGNAL_SITES.items():
        assert len(names) >= 3 and {s for s, g in grades.items() if g == {grade}} == set(names)
    assert len(SITE_SIGNAL_SITES["HGG"]) == len(SITE_SIGNAL_SITES["LGG"])
    # the look is drawn independently of the label, as in "none"; the labels are those of "grade"
    plan = synthetic_plan(30, 210 / 285, 4, signal="site")
    assert [g for _, g, _ in plan] == [g for _, g, _ in synthetic_plan(30, 210 / 285, 4)]
    assert any(lab != lk for _, lab, lk in plan)
    counts = defaultdict(int)
    for cid, _, _ in plan:
        counts[site_of(cid)] += 1
    for names in SITE_SIGNAL_SITES.values():  # each grade's cases spread evenly over its sites
        assert max(counts[s] for s in names) - min(counts[s] for s in names) <= 1


def _gradient_features(imprint: np.ndarray) -> np.ndarray:
    """What a network can read off an imprint and carry to another site: its mean slope along each axis (a ramp's
    direction and sign) and its squared slope along each axis (the axis it varies along)."""
    slopes = np.gradient(np.log(imprint))
    return np.array([*(s.mean() for s in slopes), *((s**2).mean() for s in slopes)])


def test_site_imprints_are_drawn_independently_of_the_grade():
    """The HGG sites' imprints shared a direction in version 1 (hand-set ramps: every HGG site along axes 0-1, every
    LGG site along axes 1-2), which a network trained on some sites carried to sites it never saw. Now each site's
    imprint is drawn from the set's seed and its name: over 40 sets, no slope feature tells the grades apart."""
    from gliograde.data.synthetic import SITE_SIGNAL_SITES, scanner_imprint

    shape = (16, 16, 16)
    differences = []
    for seed in range(40):
        means = {grade: np.mean([_gradient_features(scanner_imprint(s, shape, seed)) for s in names], axis=0)
                 for grade, names in SITE_SIGNAL_SITES.items()}  # fmt: skip
        differences.append(means["HGG"] - means["LGG"])
    d = np.array(differences)
    z = d.mean(axis=0) / (d.std(axis=0, ddof=1) / np.sqrt(len(d)))
    assert np.all(np.abs(z) < 3), z  # a grade-aligned design differs by the same amount in every set (z infinite)
    one = scanner_imprint("CBICA", shape, 3)
    assert np.array_equal(one, scanner_imprint("CBICA", shape, 3)) and one.min() > 0  # deterministic, multiplicative
    assert np.log(one).std() == pytest.approx(0.5, rel=1e-3)  # x e^(+-0.5) at one SD
    for other in (scanner_imprint("CBICA", shape, 4), scanner_imprint("TCIA09", shape, 3)):  # another set, site
        assert not np.allclose(one, other)
