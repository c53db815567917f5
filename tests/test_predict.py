"""predict: the fold ensemble on NIfTI cases, flip TTA, Grad-CAM back on the case's grid, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import copy_case

from gliograde import MODALITIES
from gliograde.checkpoints import load_checkpoint
from gliograde.cli import main
from gliograde.data.brats import discover_cases, read_case_folder
from gliograde.errors import DataError
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.scoring import model_from_checkpoint
from gliograde.inference.predict import PredictError, load_ensemble, output_dir, predict_cases
from gliograde.inference.qc import NOT_ENOUGH
from gliograde.inference.saliency import VIEWS, map_centre, saliency_png, views
from gliograde.networks.gradcam import grad_cam


@pytest.fixture(scope="module")
def ensemble(cv_run):
    _, cfg, _ = cv_run
    return load_ensemble([cfg.output_dir])


def test_the_ensemble_prepares_cases_as_the_cache_and_averages_the_folds(cv_run, ensemble, synth_root, tmp_path):
    cache, _, _ = cv_run
    assert [m.fold for m in ensemble] == [0, 1, 2] and all(m.checkpoint.name == "best.pt" for m in ensemble)
    cases = discover_cases(synth_root).cases[:2]
    records = predict_cases(cases, ensemble, output_dir(tmp_path / "out"))
    for case, record in zip(cases, records, strict=True):
        x = torch.from_numpy(cache.volumes[cache.ids.index(case.id)].astype(np.float32))[None]
        expected, raw = [], []
        for m in ensemble:
            model = model_from_checkpoint(load_checkpoint(m.checkpoint), m.checkpoint)
            with torch.no_grad():
                raw.append(float(torch.softmax(model(x), 1)[0, 1]))
            # each fold's probability at the operating point its run fitted on its selection part
            final = json.loads((m.checkpoint.parent.parent / "metrics" / "metrics.json").read_text())["final"]
            expected.append(float(OperatingPoint.from_dict(final["operating_point"]).apply(np.array([raw[-1]]))[0]))
        assert list(record["folds"].values()) == pytest.approx(expected, abs=1e-6)
        assert record["p_hgg"] == pytest.approx(np.mean(expected), abs=1e-6)
        assert record["p_hgg_raw"] == pytest.approx(np.mean(raw), abs=1e-6)
        threshold = np.mean([m.point.threshold for m in ensemble])
        assert record["threshold"] == pytest.approx(threshold)
        assert record["predicted_grade"] == ("HGG" if record["p_hgg"] >= threshold else "LGG")
        assert record["true_grade"] == case.grade
        # the ensemble was trained on these phantoms: said so, not scored as new patients
        assert "seen_in_training" in record["qc"]["flags"] and record["qc"]["same_id_as_training_case"] == case.id
    header = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0]
    assert header == "case,p_hgg,threshold,predicted_grade,true_grade,fold_0,fold_1,fold_2,qc_flags"
    meta = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert f"threshold = {meta['threshold']:.4f}" in meta["operating_point_explained"]
    assert all(r["decision_rule"] == "HGG when p_hgg >= threshold, else LGG" for r in meta["predictions"])
    with pytest.raises(PredictError, match="already holds files"):
        output_dir(tmp_path / "out")
    with pytest.raises(PredictError, match="twice"):
        predict_cases([cases[0], cases[0]], ensemble, output_dir(tmp_path / "again"))


def test_every_decision_is_printed_with_its_threshold():
    from types import SimpleNamespace

    from gliograde.inference.predict import decision_text, operating_point_text

    record = {
        "case": "P7",
        "p_hgg": 0.832,
        "threshold": 0.8512,
        "predicted_grade": "LGG",
        "folds": {"a": 0.8, "b": 0.9},
    }
    assert decision_text(record) == "P7: P(HGG) = 0.8320 < threshold 0.8512 -> LGG (folds 0.800, 0.900)"
    hgg = {**record, "p_hgg": 0.86, "predicted_grade": "HGG", "folds": {"a": 0.86}}
    assert decision_text(hgg) == "P7: P(HGG) = 0.8600 >= threshold 0.8512 -> HGG"
    known = {**record, "true_grade": "LGG", "qc": {"flags": ["seen_in_training"], "ood": {"verdict": NOT_ENOUGH}}}
    assert decision_text(known) == (
        "P7: P(HGG) = 0.8320 < threshold 0.8512 -> LGG (folds 0.800, 0.900); true grade LGG; flags: seen_in_training; "
        "out of distribution? not enough training patients to judge"
    )
    # a figure's title: the decision and its threshold, the true grade and the flags, not the folds
    title = "P7: P(HGG) = 0.8320 < threshold 0.8512 -> LGG; true grade LGG; flags: seen_in_training"
    assert decision_text(known, brief=True) == title
    members = [
        SimpleNamespace(point=OperatingPoint(0.74, 0.5, threshold=t, threshold_rule="youden")) for t in (0.8, 0.9)
    ]
    text = operating_point_text(members, 0.85)
    assert "threshold = 0.8500" in text and "not 0.5" in text and "youden" in text and "50/50 prior" in text


def test_saliency_lies_on_the_case_grid_and_survives_another_orientation(ensemble, synth_root, tmp_path):
    case = discover_cases(synth_root).cases[0]
    # the same patient stored in another orientation (axes permuted and flipped, affine adjusted)
    turned = tmp_path / "turned" / "turned_case"
    turned.mkdir(parents=True)
    ornt = np.array([[1, -1], [0, 1], [2, -1]])
    for m in MODALITIES:
        img = nib.load(str(case.paths[m]))
        nib.save(img.as_reoriented(ornt), str(turned / f"{case.id}_{m}.nii.gz"))
    records = predict_cases(
        [case, read_case_folder(turned)], ensemble, output_dir(tmp_path / "out"), tta=True, saliency=True
    )
    assert records[0]["p_hgg"] == pytest.approx(records[1]["p_hgg"], abs=1e-6)
    maps = []
    for record, folder in zip(records, (case.paths["flair"].parent, turned), strict=True):
        image = nib.load(record["saliency"]["nifti"])
        flair = nib.load(str(next(folder.glob("*_flair.nii.gz"))))
        assert image.shape == flair.shape and np.allclose(image.affine, flair.affine)
        data = image.get_fdata()
        assert data.min() >= 0 and 0.5 < data.max() <= 1 + 1e-6
        brain = np.any([nib.load(str(p)).get_fdata() != 0 for p in folder.glob("*_t*.nii.gz")], axis=0) | (
            flair.get_fdata() != 0
        )
        assert data[~brain].sum() < 0.05 * data.sum()  # the map lives in the head, not in the background
        maps.append(nib.as_closest_canonical(image).get_fdata())
        assert Path(record["saliency"]["png"]).is_file()
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


def test_the_saliency_views_cut_through_the_maps_mass_not_its_rim_peak(sample_root, tmp_path):
    flair_path = sample_root / "LGG" / "Brats18_TCIA10_628_1" / "Brats18_TCIA10_628_1_flair.nii.gz"
    flair = nib.as_closest_canonical(nib.load(str(flair_path)))
    brain = flair.get_fdata() != 0
    inside = np.argwhere(brain)
    rim = tuple(int(i) for i in inside[np.argmax(inside[:, 0])])  # the brain's outermost voxel to the right
    mass = tuple(int(i) for i in np.rint(inside.mean(0)))  # a blob in the middle of the brain
    assert brain[mass]
    grid = np.ogrid[tuple(slice(0, n) for n in brain.shape)]
    heat = 0.6 * np.exp(-sum((g - m) ** 2 for g, m in zip(grid, mass, strict=True)) / (2 * 8.0**2)) * brain
    heat[rim] = 1.0
    png = tmp_path / "map.png"
    where = saliency_png(nib.Nifti1Image(heat.astype(np.float32), flair.affine), flair_path, png, "title")
    assert where["peak_voxel_ras"] == list(rim)
    centre = where["centre_voxel_ras"]
    assert np.abs(np.subtract(centre, mass)).max() <= 2 and brain[tuple(centre)]
    assert png.is_file() and png.stat().st_size > 10_000
    # a mass whose centroid falls in a hole (a shell): the cut moves to the nearest brain voxel carrying the map
    shell = np.sqrt(sum((g - 12.0) ** 2 for g in np.ogrid[:25, :25, :25]))
    ring = (shell > 5) & (shell < 8)
    assert not ring[12, 12, 12] and ring[map_centre(ring.astype(float), ring)]


def test_the_views_put_the_patients_right_anterior_and_superior_where_their_letters_say():
    shape = (20, 30, 40)
    for name, letters in VIEWS.items():
        shown = []
        for axis, positive in enumerate("RAS"):  # RAS voxel order: x to the right, y anterior, z superior
            _, img = views(np.indices(shape)[axis].astype(float), (5, 7, 9))[name]
            left, right, top, bottom = letters
            if img[:, -1].mean() != img[:, 0].mean():
                shown.append(positive)
                assert (right if img[:, -1].mean() > img[:, 0].mean() else left) == positive
            elif img[0].mean() != img[-1].mean():
                shown.append(positive)
                assert (top if img[0].mean() > img[-1].mean() else bottom) == positive
        assert len(shown) == 2  # each view shows two of the three directions, the third is its slice index


def test_a_training_patient_is_flagged_and_a_grade_folder_gives_the_true_grade(cv_run, synth_root, tmp_path, caplog):
    _, cfg, _ = cv_run
    case = sorted((synth_root / "HGG").iterdir())[0]  # a patient the ensemble was trained on
    out = tmp_path / "pred"
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["predict", "--runs", cfg.output_dir, "--case", str(case), "--out", str(out)]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    fields = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    meta = json.loads((out / "predictions.json").read_text())
    assert fields["qc_flags"].split() == ["grid_not_brats", "seen_in_training"] and fields["true_grade"] == "HGG"
    assert float(fields["threshold"]) == pytest.approx(meta["threshold"], abs=1e-6)
    record = meta["predictions"][0]
    assert record["true_grade"] == "HGG" and record["qc"]["same_id_as_training_case"] == case.name
    assert record["qc"]["same_image_as_training_case"] == case.name
    printed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{case.name}: P(HGG)"))
    assert "threshold" in printed and "true grade HGG" in printed and "seen_in_training" in printed
    # the same images under a new name, in a folder that gives no grade: caught by the image, grade unknown
    renamed = tmp_path / "new" / "patient_b"
    renamed.mkdir(parents=True)
    for m in MODALITIES:
        shutil.copy(case / f"{case.name}_{m}.nii.gz", renamed / f"scan_{m}.nii.gz")
    assert main(["predict", "--runs", cfg.output_dir, "--case", str(renamed), "--out", str(tmp_path / "p2")]) == 0
    record = json.loads((tmp_path / "p2" / "predictions.json").read_text())["predictions"][0]
    assert record["true_grade"] is None and "seen_in_training" in record["qc"]["flags"]
    assert record["qc"]["same_id_as_training_case"] is None
    assert record["qc"]["same_image_as_training_case"] == case.name


def test_grad_cam_picks_a_stage_that_can_localize():
    from gliograde.networks.resnet3d import ResNet3D

    model = ResNet3D(10, 4, 2)
    x = torch.randn(1, 4, 32, 32, 32)
    cam, layer = grad_cam(model, x)
    assert layer == "layer2" and cam.shape == (1, 32, 32, 32)  # layer4 of a 32^3 input is one voxel
    assert grad_cam(model, torch.randn(1, 4, 128, 128, 128))[1] == "layer4"


def test_checkpoints_that_disagree_are_refused(cv_run, tmp_path):
    _, _, report = cv_run
    run = tmp_path / "other_run"
    shutil.copytree(report["folds"][0]["run"], run)
    path = run / "checkpoints" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["size"] = 32
    torch.save(ckpt, path)
    with pytest.raises(PredictError, match="disagree on input size"):
        load_ensemble([report["folds"][1]["run"], run])
    ckpt["size"], ckpt["modalities"] = 16, ["flair"]
    torch.save(ckpt, path)
    with pytest.raises(PredictError, match="disagree on modalities"):
        load_ensemble([report["folds"][1]["run"], run])


def test_a_case_lacking_a_modality_is_named(synth_root, tmp_path):
    case = discover_cases(synth_root).cases[0]
    folder = copy_case(synth_root, case.id, tmp_path, case.grade)
    (folder / f"{case.id}_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"{case.id}.*no t1ce file"):
        read_case_folder(folder)
    assert main(["predict", "--runs", str(tmp_path), "--case", str(folder)]) == 2


def test_predict_command_line(cv_run, synth_root, tmp_path):
    _, cfg, _ = cv_run
    case = discover_cases(synth_root).cases[3]
    # a plain folder of case folders with non-BraTS file names
    plain = tmp_path / "new" / "patient_a"
    plain.mkdir(parents=True)
    for m in MODALITIES:
        shutil.copy(case.paths[m], plain / f"scan_{m}.nii.gz")
    out = tmp_path / "pred"
    assert main(["predict", "--runs", cfg.output_dir, "--data-root", str(tmp_path / "new"), "--out", str(out)]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("patient_a,")


def test_a_case_that_fails_when_read_is_said_once_and_leaves_the_out_folder_reusable(cv_run, synth_root, tmp_path,
                                                                                     capsys):  # fmt: skip
    """A case whose voxels cannot be used (NaN) passes the scan and fails when preprocessed: one line naming it
    once, no empty predictions.csv presented as an output, and the same --out works on the next try."""
    _, cfg, _ = cv_run
    case = discover_cases(synth_root).cases[5]
    folder = copy_case(synth_root, case.id, tmp_path / "bad", case.grade)
    path = folder / f"{case.id}_flair.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[:] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    out = tmp_path / "pred"
    assert main(["predict", "--runs", cfg.output_dir, "--case", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count(case.id) <= 2 and "nothing was written" in err  # the reason once, the summary once
    assert not out.exists() or not any(out.iterdir())
    good = discover_cases(synth_root).cases[6]
    assert main(["predict", "--runs", cfg.output_dir, "--case", str(good.paths["flair"].parent), "--out",
                 str(out)]) == 0  # fmt: skip
    assert (out / "predictions.csv").is_file()
