"""Preprocessing and the cache, on the nine real BraTS 2018 cases and on bad copies of them."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE_HGG, SAMPLE_LGG, copy_case

from gliograde import MODALITIES
from gliograde.cli import main
from gliograde.data.brats import discover_cases
from gliograde.data.cache import open_cache, prepare_cache
from gliograde.data.preprocess import load_segmentation, preprocess_case, to_original_grid
from gliograde.errors import DataError


def test_real_cache_shape_table_and_manifest(real_cache, sample_root):
    assert real_cache.volumes.shape == (9, 4, 128, 128, 128)
    assert real_cache.volumes.dtype == np.float16
    assert isinstance(real_cache.volumes, np.memmap)
    assert real_cache.modalities == MODALITIES
    assert [c.id for c in real_cache.cases] == SAMPLE_HGG + SAMPLE_LGG
    assert [c.label for c in real_cache.cases] == [1] * 5 + [0] * 4
    assert real_cache.cases[0].site == "2013" and real_cache.cases[5].site == "TCIA10"
    m = real_cache.manifest
    assert m["params"]["size"] == 128 and m["params"]["modalities"] == list(MODALITIES)
    assert set(m["versions"]) >= {"gliograde", "nibabel", "numpy"} and m["created"]
    assert len(m["sources"]) == 36 and all(s["bytes"] > 0 and s["mtime_ns"] > 0 for s in m["sources"])


def test_zscore_inside_brain_and_zero_background(real_cache):
    for i in range(len(real_cache.cases)):
        vol = np.asarray(real_cache.volumes[i], np.float64)
        brain = np.any(vol != 0, axis=0)
        assert 0.2 < brain.mean() < 0.8  # cropped to the brain: it fills much of the cube
        for c in range(4):
            inside = vol[c][brain]
            assert abs(inside.mean()) < 0.02 and abs(inside.std() - 1) < 0.02, (i, c)
            assert (vol[c][~brain] == 0).all()
        assert (vol[:, 0, 0, 0] == 0).all() and (vol[:, -1, -1, -1] == 0).all()  # corners are background


def test_cases_rescaled_to_32767_stay_finite(real_cache, sample_root):
    for cid in ("Brats18_TCIA10_637_1", "Brats18_TCIA10_639_1"):
        raw = [np.asarray(nib.load(sample_root / "LGG" / cid / f"{cid}_{m}.nii.gz").dataobj) for m in MODALITIES]
        assert max(int(r.max()) for r in raw) == 32767
        vol = np.asarray(real_cache.volumes[real_cache.ids.index(cid)], np.float32)
        assert np.isfinite(vol).all() and np.abs(vol).max() < 1000


def test_canonical_orientation_makes_axes_mean_the_same(sample_root, tmp_path):
    """The same physical image stored in another voxel order (RAS, and a permuted one) gives the same volume."""
    case = discover_cases(sample_root).cases[5]
    expected, _ = preprocess_case(case, size=32)
    for codes in (("R", "A", "S"), ("A", "S", "L")):
        folder = tmp_path / "".join(codes) / "LGG" / case.id
        folder.mkdir(parents=True)
        for m, p in case.paths.items():
            img = nib.load(p)
            target = nib.orientations.axcodes2ornt(codes)
            moved = img.as_reoriented(
                nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), target)
            )
            assert nib.aff2axcodes(moved.affine) == codes
            nib.save(moved, str(folder / f"{case.id}_{m}.nii.gz"))
        other = discover_cases(folder.parents[1]).cases[0]
        got, _ = preprocess_case(other, size=32)
        assert np.array_equal(got, expected), codes


def test_geometry_maps_back_onto_the_original_grid(sample_root):
    case = discover_cases(sample_root).cases[1]
    vol, geometry = preprocess_case(case, size=64)
    back = to_original_grid((vol[3] != 0).astype(np.float32), geometry)
    flair = nib.load(case.paths["flair"])
    assert back.shape == flair.shape and np.allclose(back.affine, flair.affine)
    brain = np.asarray(flair.dataobj) > 0
    mapped = back.get_fdata() > 0.5
    overlap = (brain & mapped).sum() / (brain | mapped).sum()
    assert overlap > 0.9


def test_segmentations_int16_and_uint8(sample_root):
    for grade, cid, dtype in (
        ("HGG", "Brats18_2013_3_1", np.int16),
        ("HGG", "Brats18_CBICA_ABM_1", np.uint8),
    ):
        path = sample_root / grade / cid / f"{cid}_seg.nii.gz"
        assert nib.load(path).get_data_dtype() == dtype
        seg = load_segmentation(path)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 4}


# ------------------------------------------------------------------------------------------------ reuse
def _two_case_root(sample_root, tmp_path):
    root = tmp_path / "data"
    copy_case(sample_root, "Brats18_2013_3_1", root)
    copy_case(sample_root, "Brats18_TCIA10_628_1", root)
    return root


def test_cache_is_reused_then_rebuilt_when_stale(sample_root, tmp_path):
    root = _two_case_root(sample_root, tmp_path)
    out = tmp_path / "cache"
    first = prepare_cache(root, out, size=24, workers=1, progress=False)
    assert not first.reused and first.n_cases == 2
    created = json.loads((out / "manifest.json").read_text())["created"]
    assert prepare_cache(root, out, size=24, workers=1, progress=False).reused
    assert not prepare_cache(root, out, size=20, workers=1, progress=False).reused  # other parameters
    assert open_cache(out).volumes.shape[-1] == 20
    flair = root / "HGG" / "Brats18_2013_3_1" / "Brats18_2013_3_1_flair.nii.gz"
    st = flair.stat()
    os.utime(flair, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed source
    again = prepare_cache(root, out, size=20, workers=1, progress=False)
    assert not again.reused and json.loads((out / "manifest.json").read_text())["created"] >= created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]  # no temporary folders left


# ------------------------------------------------------------------------------------------- bad input
def _rewrite(path, data, affine=None, like=None):
    like = like or nib.load(path)
    nib.save(nib.Nifti1Image(data, like.affine if affine is None else affine), str(path))


def _truncate(p):
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def _nan(p):
    d = nib.load(p).get_fdata(dtype=np.float32)
    d[100:110, 100:110, 70] = np.nan
    _rewrite(p, d)


def _zero(p):
    _rewrite(p, np.zeros(nib.load(p).shape, np.int16))


def _four_d(p):
    d = np.asarray(nib.load(p).dataobj)
    _rewrite(p, np.stack([d, d], axis=-1))


def _two_d(p):
    _rewrite(p, np.asarray(nib.load(p).dataobj)[:, :, 70])


def _other_shape(p):
    _rewrite(p, np.asarray(nib.load(p).dataobj)[:, :, :150])


def _other_affine(p):
    img = nib.load(p)
    _rewrite(p, np.asarray(img.dataobj), affine=img.affine @ np.diag([2.0, 1, 1, 1]))


def _not_gzip(p):
    p.write_bytes(b"this is not an image")


BAD = {  # kind: (spoil, message at preprocessing, message of the scan (None: seen only when the voxels are read))
    "truncated": (_truncate, r"truncated or corrupt|cannot be read", r"_t2.nii.gz is truncated: \d+ of the \d+ bytes"),
    "not-gzip": (_not_gzip, "cannot be read as NIfTI", "_t2.nii.gz cannot be read as NIfTI"),
    "nan": (_nan, "NaN or Inf voxels", None),
    "all-zero": (_zero, "every voxel is zero", None),
    "4d": (_four_d, r"4D image .*3D volume is expected", r"4D image .*3D volume is expected"),
    "2d": (_two_d, r"2D image .*3D volume is expected", r"2D image .*3D volume is expected"),
    "shape": (_other_shape, r"not on one voxel grid \(shape 240 x 240 x 150 vs 240 x 240 x 155\).*must share one",
              r"_t2.nii.gz and \S+_t1.nii.gz are not on one voxel grid \(shape 240 x 240 x 150 vs 240 x 240 x 155\)"),
    "affine": (_other_affine, r"not on one voxel grid \(voxel size 2 x 1 x 1 vs 1 x 1 x 1 mm\).*must share one",
               r"_t2.nii.gz and \S+_t1.nii.gz are not on one voxel grid \(voxel size 2 x 1 x 1 vs 1 x 1 x 1 mm\)"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_is_named(sample_root, tmp_path, kind):
    """Named by the scan where its header tells (before any case is preprocessed), and by the preprocessing anyway."""
    spoil, message, scanned = BAD[kind]
    case_dir = copy_case(sample_root, "Brats18_TCIA10_628_1", tmp_path / "data")
    case = discover_cases(tmp_path / "data").cases[0]
    bad = case_dir / "Brats18_TCIA10_628_1_t2.nii.gz"
    spoil(bad)
    if scanned is None:
        assert discover_cases(tmp_path / "data").cases[0] == case
    else:
        with pytest.raises(DataError, match=scanned) as err:
            discover_cases(tmp_path / "data")
        text = str(err.value)
        assert "case Brats18_TCIA10_628_1 " in text and "--skip-incomplete" in text and "\n" not in text
        assert "[[" not in text and len(text) < 400  # no affine matrices, no wall of text
    with pytest.raises(DataError, match=message) as err:
        preprocess_case(case, size=16)
    assert "Brats18_TCIA10_628_1" in str(err.value) and ("_t2.nii.gz" in str(err.value))
    assert "[[" not in str(err.value)


def test_corrupt_case_fails_prepare_cleanly_or_is_skipped(sample_root, tmp_path, capsys, monkeypatch):
    root = _two_case_root(sample_root, tmp_path)
    gz = root / "LGG" / "Brats18_TCIA10_628_1" / "Brats18_TCIA10_628_1_flair.nii.gz"
    gz.write_bytes(gzip.compress(b"\0" * 348))  # a valid gzip with a nonsense header
    import gliograde.data.cache as cache_module

    preprocessed = []  # the scan names the file: no case is preprocessed before the refusal
    real_run = cache_module._run_parallel
    monkeypatch.setattr(cache_module, "_run_parallel", lambda jobs, *a: preprocessed.extend(jobs) or real_run(jobs, *a))
    out = tmp_path / "cache"
    code = main(
        [
            "prepare",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--size",
            "16",
            "--workers",
            "2",
            "--folds",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Brats18_TCIA10_628_1_flair.nii.gz" in err and "Traceback" not in err
    assert "--skip-incomplete" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert preprocessed == []

    result = prepare_cache(root, out, size=16, workers=2, skip_incomplete=True, progress=False)
    assert result.n_cases == 1 and "cannot be read as NIfTI" in result.discovery.skipped["Brats18_TCIA10_628_1"]
    assert [job[1].id for job in preprocessed] == ["Brats18_2013_3_1"]  # the unreadable case left out by the scan
    cache = open_cache(out)
    assert cache.ids == ["Brats18_2013_3_1"] and cache.volumes.shape[0] == 1
    assert "Brats18_TCIA10_628_1" in cache.manifest["skipped"]


def test_a_truncated_file_is_named_by_the_scan_before_any_case_is_preprocessed(sample_root, tmp_path, monkeypatch):
    """Issue 25: a truncated .nii.gz among the real cases was reported only once every case had been preprocessed.
    The scan reads each header and the length the gzip stream records in its last four bytes; a complete stream
    written in two members (whose last member records only its own length) is read through and passes."""
    import gliograde.data.cache as cache_module

    root = tmp_path / "data"
    for case in (*SAMPLE_HGG[:2], *SAMPLE_LGG[:2]):
        copy_case(sample_root, case, root)
    flair = root / "LGG" / SAMPLE_LGG[1] / f"{SAMPLE_LGG[1]}_flair.nii.gz"
    raw = flair.read_bytes()
    flair.write_bytes(raw[: len(raw) - 4096])  # the last 4 KiB lost: the header and most of the data still read
    monkeypatch.setattr(cache_module, "_run_parallel", lambda *a: pytest.fail("preprocessing started"))
    with pytest.raises(DataError, match=rf"case {SAMPLE_LGG[1]} .*_flair.nii.gz is truncated.*--skip-incomplete"):
        prepare_cache(root, tmp_path / "cache", size=16, workers=1, progress=False)
    assert not (tmp_path / "cache").exists()
    # a stream in two gzip members (what some tools write): ISIZE disagrees, the data is all there: accepted
    flair.write_bytes(gzip.compress(gzip.decompress(raw)[:1000]) + gzip.compress(gzip.decompress(raw)[1000:]))
    assert [c.id for c in discover_cases(root).cases] == [*SAMPLE_HGG[:2], *SAMPLE_LGG[:2]]


def test_prepare_refuses_to_overwrite_a_foreign_folder(sample_root, tmp_path):
    root = _two_case_root(sample_root, tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a gliograde cache"):
        prepare_cache(root, out, size=16, workers=1, progress=False)
    assert (out / "notes.txt").read_text() == "precious"


# ------------------------------------------------------------------------------------ resizing without torch
def _torch_resize(x: np.ndarray, size: int) -> np.ndarray:
    """The resize preprocess_case used before it left torch: F.interpolate, area down, trilinear up."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    if t.shape[-1] == size:
        return t.numpy()
    mode = "area" if t.shape[-1] > size else "trilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t[None], size=(size,) * 3, mode=mode, **kwargs)[0].numpy()


def _torch_preprocess(case, size: int) -> np.ndarray:
    """preprocess_case as it was written with torch (resize and z-score), the reference for the numpy one."""
    import torch

    from gliograde.data.preprocess import load_case

    stack, _ = load_case(case)
    nz = np.nonzero(np.any(stack != 0, axis=0))
    lo = [max(int(a.min()) - 4, 0) for a in nz]
    hi = [min(int(a.max()) + 5, n) for a, n in zip(nz, stack.shape[1:], strict=True)]
    extent = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
    cube, pad = max(extent), [(max(extent) - e) // 2 for e in extent]
    x = np.zeros((4, cube, cube, cube), np.float32)
    x[:, pad[0] : pad[0] + extent[0], pad[1] : pad[1] + extent[1], pad[2] : pad[2] + extent[2]] = stack[
        :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
    ]
    resized = torch.from_numpy(_torch_resize(x, size))
    mask = torch.from_numpy(_torch_resize((x != 0).any(0, keepdims=True).astype(np.float32), size))[0] > 0.5
    out = torch.zeros_like(resized)
    for c in range(4):
        voxels = resized[c][mask].double()
        out[c][mask] = ((voxels - voxels.mean()) / float(voxels.std())).float()
    return out.numpy().astype(np.float16)


@pytest.mark.parametrize("shape", [(170, 128), (163, 128), (37, 16), (129, 128), (5, 3), (16, 37), (32, 64), (3, 5)])
def test_resize_cube_reproduces_torch_interpolate(shape):
    """numpy area (shrinking) and trilinear (growing, align_corners=False) against F.interpolate, and the mask."""
    from gliograde.data.preprocess import resize_cube, resize_mask

    n, size = shape
    rng = np.random.default_rng(n * 1000 + size)
    x = rng.random((2, n, n, n), dtype=np.float32) * 2000
    x[x < 800] = 0
    got, want = resize_cube(x, size), _torch_resize(x, size)
    assert got.shape == (2, size, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * 2000)  # bit-identical on x86-64 with FMA
    mask = (x != 0).any(0)
    assert np.array_equal(resize_mask(mask, size), _torch_resize(mask[None].astype(np.float32), size)[0] > 0.5)


@pytest.mark.parametrize(("index", "size"), [(0, 128), (6, 128), (3, 32)])
def test_preprocessing_without_torch_matches_the_torch_one_on_real_cases(sample_root, index, size):
    """A real case (index 6: Brats18_TCIA10_637_1, rescaled to the int16 maximum) through the numpy preprocessing and
    through the torch one it replaces: the same brain mask, and the same float16 volume within one float16 step."""
    case = discover_cases(sample_root).cases[index]
    got, _ = preprocess_case(case, size=size)
    want = _torch_preprocess(case, size)
    assert got.shape == want.shape == (4, size, size, size) and got.dtype == np.float16
    assert np.array_equal(got != 0, want != 0)
    a, b = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=2**-10, atol=2**-14)
    assert np.count_nonzero(a != b) <= 1e-5 * a.size  # 0 here: bit-identical
