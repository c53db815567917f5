"""Grad-CAM attention on the tumour: the scores on hand-made maps, the mask on the cache grid, the report."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_HGG, SAMPLE_LGG, copy_case

from gliograde.data.brats import discover_cases
from gliograde.data.cache import GEOMETRY, open_cache, prepare_cache
from gliograde.data.preprocess import load_segmentation, load_volume, preprocess_case
from gliograde.errors import GliogradeError
from gliograde.evaluation.attention import (
    attention_report,
    attention_scores,
    cam_grid,
    mask_on_cache_grid,
    summarize_attention,
)
from gliograde.networks.gradcam import grad_cam
from gliograde.networks.resnet3d import ResNet3D

FLAIR = 3


def _blob():
    brain = np.zeros((16, 16, 16), bool)
    brain[2:14, 2:14, 2:14] = True  # 1728 voxels
    mask = np.zeros_like(brain)
    mask[4:8, 4:8, 4:8] = True  # 64 voxels, inside the brain
    return brain, mask


def test_cam_inside_mask_scores_one_and_hits():
    brain, mask = _blob()
    cam = np.zeros(mask.shape)
    cam[5:7, 5:7, 5:7] = 1.0
    cam[6, 6, 6] = 3.0
    s = attention_scores(cam, mask, brain)
    assert s["mass_in_mask"] == pytest.approx(1.0)
    assert s["pointing_hit"] is True
    assert s["mask_fraction_of_brain"] == pytest.approx(64 / 1728)


def test_cam_outside_mask_scores_zero_and_misses():
    brain, mask = _blob()
    cam = np.zeros(mask.shape)
    cam[10:13, 10:13, 10:13] = 0.5
    cam[4:8, 4:8, 4:8] = -2.0  # negative evidence is clipped, it does not count as mass
    s = attention_scores(cam, mask, brain)
    assert s["mass_in_mask"] == pytest.approx(0.0)
    assert s["pointing_hit"] is False


def test_uniform_cam_over_brain_is_the_chance_level():
    brain, mask = _blob()
    volume = np.where(brain, np.random.default_rng(0).normal(size=brain.shape), 0.0)[None].repeat(2, 0)
    s = attention_scores(brain.astype(float), mask, volume)  # brain given as a (C, D, H, W) image
    assert s["mass_in_mask"] == pytest.approx(s["mask_fraction_of_brain"])
    assert s["mask_fraction_of_brain"] == pytest.approx(64 / 1728)
    # without a brain, the whole grid is the reference
    assert attention_scores(np.ones(mask.shape), mask)["mask_fraction_of_brain"] == pytest.approx(64 / 16**3)


def test_zero_cam_has_no_mass_and_points_nowhere():
    _, mask = _blob()
    s = attention_scores(np.zeros(mask.shape), mask)
    assert math.isnan(s["mass_in_mask"]) and s["pointing_hit"] is False


def test_coarse_cam_is_upsampled_to_the_mask():
    mask = np.zeros((16, 16, 16), bool)
    mask[:8, :8, :8] = True  # one octant = one voxel of a 2^3 map
    cam = np.zeros((2, 2, 2))
    cam[0, 0, 0] = 1.0
    s = attention_scores(cam, mask)
    assert s["pointing_hit"] is True
    # trilinear (align_corners=False) spreads the corner voxel a little across the octant border, symmetrically
    assert 0.6 < s["mass_in_mask"] < 1.0
    cam[0, 0, 0], cam[1, 1, 1] = 0.0, 1.0
    far = attention_scores(cam, mask)
    assert far["pointing_hit"] is False and far["mass_in_mask"] < 0.1
    uniform = attention_scores(np.ones((2, 2, 2)), mask)
    assert uniform["mass_in_mask"] == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="finer"):
        attention_scores(np.ones((32, 32, 32)), mask)


def test_summary_counts_scored_and_skipped():
    per_case = [
        {"id": "a", "mass_in_mask": 0.5, "pointing_hit": True, "chance": 0.1},
        {"id": "b", "mass_in_mask": 0.1, "pointing_hit": False, "chance": 0.3},
        {"id": "c", "mass_in_mask": math.nan, "pointing_hit": False, "chance": 0.2},  # an all-zero map
        {"id": "d", "mass_in_mask": math.nan, "pointing_hit": None, "chance": math.nan, "skipped": "no seg"},
    ]
    s = summarize_attention(per_case)
    assert s["n"] == 3
    assert s["mean_mass_in_mask"] == pytest.approx(0.3)
    assert s["mean_chance"] == pytest.approx(0.2)
    assert s["pointing_game_accuracy"] == pytest.approx(1 / 3)
    assert s["skipped"] == {"d": "no seg"}
    empty = summarize_attention([])
    assert empty["n"] == 0 and math.isnan(empty["mean_mass_in_mask"])


@pytest.mark.parametrize("case_id", [SAMPLE_HGG[0], SAMPLE_LGG[0]])
def test_mask_on_cache_grid_of_a_real_case(sample_root, case_id):
    case = next(c for c in discover_cases(sample_root).cases if c.id == case_id)
    assert case.seg is not None
    size = 64
    volume, geometry = preprocess_case(case, size=size)
    mask = mask_on_cache_grid(case.seg, geometry.to_dict(), size)
    assert mask.shape == (size,) * 3 and mask.dtype == bool
    assert mask.sum() > 0
    flair = volume[FLAIR] != 0
    assert (mask & flair).sum() / mask.sum() >= 0.95
    # the tumour keeps its share of the brain through crop, pad and resize
    seg = load_segmentation(case.seg) > 0
    brain = np.any([load_volume(p)[0] != 0 for p in case.files], axis=0)
    original = (seg & brain).sum() / brain.sum()
    on_grid = (mask & (volume != 0).any(0)).sum() / (volume != 0).any(0).sum()
    assert original / 1.1 < on_grid < original * 1.1  # measured: within 1 % on the nine sample cases
    # a Geometry object works as well as its dict, and the grid size is honoured
    assert np.array_equal(mask_on_cache_grid(case.seg, geometry, size), mask)


def test_mask_needs_geometry_and_a_matching_grid(sample_root, tmp_path):
    case = next(c for c in discover_cases(sample_root).cases if c.id == SAMPLE_HGG[0])
    with pytest.raises(GliogradeError, match="geometry"):
        mask_on_cache_grid(case.seg, None, 32)
    with pytest.raises(GliogradeError, match="crop_lo"):
        mask_on_cache_grid(case.seg, {"original_shape": [240, 240, 155]}, 32)
    _, geometry = preprocess_case(case, size=16)
    small = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(small))
    with pytest.raises(GliogradeError, match="differ from the case's image grid"):
        mask_on_cache_grid(small, geometry, 16)


def test_layer3_cam_is_finer_than_layer4():
    torch.manual_seed(0)
    model = ResNet3D(depth=10, in_channels=1, layout="strided")
    g3, g4 = cam_grid(model, 32, "layer3"), cam_grid(model, 32, "layer4")
    assert g3 == (2, 2, 2) and g4 == (1, 1, 1)  # strides 2 (conv1), 2 (maxpool), 2, 2, 2
    assert cam_grid(model, 64, "layer3") == (4, 4, 4) and cam_grid(model, 64, "layer4") == (2, 2, 2)
    x = torch.randn(1, 1, 32, 32, 32)
    for layer in ("layer3", "layer4"):
        cam, used = grad_cam(model, x, layer=layer)
        assert used == layer and cam.shape == (1, 32, 32, 32)
        assert float(cam.min()) >= 0 and float(cam.max()) <= 1
    # the dilated MedicalNet layout keeps layer3 and layer4 at the same, finer resolution
    dilated = ResNet3D(depth=10, in_channels=1, layout="medicalnet")
    assert cam_grid(dilated, 32, "layer3") == cam_grid(dilated, 32, "layer4") == (4, 4, 4)


@pytest.fixture(scope="module")
def real_small_cache(sample_root, tmp_path_factory):
    """Two real cases (one HGG, one LGG) prepared at 32^3."""
    root = tmp_path_factory.mktemp("attn-real") / "data"
    copy_case(sample_root, SAMPLE_HGG[1], root)
    copy_case(sample_root, SAMPLE_LGG[1], root)
    return open_cache(prepare_cache(root, root.parent / "cache", size=32, workers=1, progress=False).path)


def _check_report(report, cache, layer):
    assert report["layer"] == layer
    assert [c["id"] for c in report["per_case"]] == cache.ids
    for c in report["per_case"]:
        assert "skipped" not in c
        assert 0.0 < c["chance"] < 1.0
        assert math.isnan(c["mass_in_mask"]) or 0.0 <= c["mass_in_mask"] <= 1.0
        assert isinstance(c["pointing_hit"], bool)
    s = report["summary"]
    assert s["n"] == len(cache.ids) and s["skipped"] == {}
    assert 0 < s["mean_chance"] < 1


def test_attention_report_on_real_cases(real_small_cache):
    cache = real_small_cache
    torch.manual_seed(0)
    model = ResNet3D(depth=10, in_channels=4)
    channels = cache.channels(["t1", "t1ce", "t2", "flair"])
    for layer in ("layer3", "layer4"):
        report = attention_report(model, cache, range(len(cache.ids)), channels, "cpu", layer=layer)
        _check_report(report, cache, layer)
    assert report["cam_grid"] == [1, 1, 1]
    # the chance level is the tumour's share of the brain on the cache grid, from the real seg files
    geometry = cache.geometry()
    seg = {c.id: c.seg for c in discover_cases(cache.manifest["data_root"]).cases}
    for row, c in enumerate(report["per_case"]):
        mask = mask_on_cache_grid(seg[c["id"]], geometry[c["id"]], cache.size)
        brain = (np.asarray(cache.volumes[row]) != 0).any(0)
        assert c["chance"] == pytest.approx((mask & brain).sum() / brain.sum())


def test_attention_report_skips_cases_without_seg(tiny_cache, tmp_path):
    cache = tiny_cache  # synthetic cases do ship <case>_seg.nii.gz
    torch.manual_seed(0)
    model = ResNet3D(depth=10, in_channels=1)
    channels = cache.channels(["flair"])
    rows = [0, 1, 2]
    full = attention_report(model, cache, rows, channels, "cpu", layer="layer1")
    assert full["summary"]["n"] == 3 and full["summary"]["skipped"] == {}
    assert full["cam_grid"] == [4, 4, 4]

    seg = {c.id: c.seg for c in discover_cases(cache.manifest["data_root"]).cases}
    ids = cache.ids
    given = {ids[0]: seg[ids[0]], ids[1]: None, ids[2]: tmp_path / "gone_seg.nii.gz"}
    report = attention_report(model, cache, rows, channels, "cpu", layer="layer1", seg_paths=given)
    skipped = report["summary"]["skipped"]
    assert report["summary"]["n"] == 1 and set(skipped) == {ids[1], ids[2]}
    assert "no segmentation file" in skipped[ids[1]] and "does not exist" in skipped[ids[2]]
    assert report["per_case"][0]["chance"] == full["per_case"][0]["chance"]
    assert report["per_case"][1]["pointing_hit"] is None and math.isnan(report["per_case"][1]["chance"])

    # the data root is gone: every case is skipped, with the reason
    moved = tmp_path / "cache-copy"
    shutil.copytree(cache.path, moved)
    copy = open_cache(moved)
    copy.manifest["data_root"] = str(tmp_path / "nowhere")
    none = attention_report(model, copy, rows, channels, "cpu", layer="layer1")
    assert none["summary"]["n"] == 0
    assert all("not available" in why for why in none["summary"]["skipped"].values())

    # a cache without geometry.json cannot place any mask
    (moved / GEOMETRY).unlink()
    with pytest.raises(GliogradeError, match=GEOMETRY):
        attention_report(model, open_cache(moved), rows, channels, "cpu")
