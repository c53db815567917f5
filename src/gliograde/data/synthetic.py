"""BraTS-like phantoms written as real gzipped NIfTI files in the BraTS 2018 layout.

Each case is a skull-stripped brain (white and grey matter, ventricles, CSF rim) with modality-specific contrast,
a smooth bias field and noise, and one tumour whose look follows its grade as in real MRI:

- HGG: a contrast-enhancing rim on T1ce around a necrotic core, wide FLAIR/T2-bright edema, heterogeneous;
- LGG: a mostly non-enhancing, homogeneous T2/FLAIR-bright mass with little edema.

The grades overlap on purpose (some HGG enhance weakly, some LGG have an enhancing focus, sizes overlap), so the
task is learnable but not trivial. Everything is drawn from `seed`: the same seed gives the same files.

Sets whose answer is known, for checking that a pipeline learns the tumour and not something else (`signal`):

- "grade" (default): the appearance follows the case's grade, as above;
- "none": each phantom is drawn with an appearance grade independent of the case's label (the grades shuffled at
  random, same HGG share), so the images hold no information about the label: an honest pipeline scores AUC ~0.5;
- "site": the images hold no grade information (as in "none"), but every site holds one grade only (half of the
  sites HGG, half LGG, no mixed 2013-style cohort) and leaves a scanner imprint on its images (a smooth
  multiplicative field of its own that z-scoring does not remove, `scanner_imprint`, drawn independently of the
  site's grade): only the site predicts the grade, from the case id or from the imprint. A network can learn the
  imprints of the sites it trains on, so folds that share sites score high, while site-grouped folds (unseen
  imprints, which share nothing with the seen ones) leave it no skill, judged site by site (see
  docs/protocol-and-statistics.md: with a handful of sites, a patient-level interval is too narrow).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from gliograde import GRADES, MODALITIES
from gliograde.errors import DataError

BRATS_SHAPE = (240, 240, 155)
BRATS2018_HGG_FRACTION = 210 / 285
SITES = ("SYNA", "SYNB", "SYNC")
# signal="site": single-grade sites named like the real single-grade BraTS 2018 sites, four per grade: a site-grouped
# 2- to 4-fold CV is possible, and 70 ways to give four of the eight sites the grade HGG for a site-level check
SITE_SIGNAL_SITES = {"HGG": ("CBICA", "TCIA01", "TCIA02", "TCIA03"), "LGG": ("TCIA09", "TCIA10", "TCIA12", "TCIA13")}
# the SD of a site's log-imprint (`scanner_imprint`): intensities x e^(+-0.5) at one SD, which per-volume z-scoring
# does not remove. (Version 1 gave the sites hand-set intensity ramps along the axes, all HGG sites on axes 0 and 1
# and all LGG sites on axes 1 and 2: a direction that carried the grade to sites a network never saw.)
SCANNER_GAIN = 0.5
SIGNALS = ("grade", "none", "site")
RECORD = "synth.json"

# Base intensities per tissue and modality (t1, t1ce, t2, flair): WM bright on T1, CSF bright on T2, dark on FLAIR.
TISSUE = {
    "csf": (0.25, 0.27, 1.00, 0.15),
    "gm": (0.60, 0.62, 0.65, 0.65),
    "wm": (0.85, 0.86, 0.45, 0.50),
    "edema": (0.55, 0.56, 0.92, 0.95),
    "necrosis": (0.30, 0.32, 0.95, 0.55),
    "enhancing": (0.55, 1.35, 0.75, 0.80),
    "lgg_core": (0.45, 0.47, 0.90, 0.88),
}


def brats_affine(shape) -> np.ndarray:
    """The BraTS affine: 1 mm voxels, LPS axes (diagonal -1, -1, 1), origin (0, Y-1, 0)."""
    return np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _smooth_field(rng: np.random.Generator, shape, grid: int) -> np.ndarray:
    """Zero-mean, unit-scale random field varying over about 1/grid of the volume (trilinear upsampling)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1, grid, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def synth_case(grade: str, shape=BRATS_SHAPE, seed: int | np.random.SeedSequence = 0, imprint=None):
    """(images: {modality: int16 array}, seg: uint8 array with labels {0, 1, 2, 4}) for one phantom. `imprint`: a
    site's multiplicative scanner field on the grid (`scanner_imprint`), or None."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)

    # brain: an ellipsoid with a wavy surface; white matter inside, grey matter rim, CSF at the edge
    semi = np.array([0.60, 0.74, 0.84]) * rng.uniform(0.92, 1.05, 3)
    r = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    r = r * (1 + 0.04 * _smooth_field(rng, shape, 6))
    brain = r < 1
    folds = 0.06 * _smooth_field(rng, shape, 14)
    tissue = np.where(r + folds < 0.72, 0, 1)  # 0 = wm, 1 = gm
    tissue = np.where(r > 0.96, 2, tissue)  # 2 = csf rim
    vsize = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        v = ((x - side * 0.11) / (0.06 * vsize)) ** 2 + ((y - 0.05) / (0.22 * vsize)) ** 2 + ((z - 0.1) / 0.12) ** 2
        tissue = np.where(v < 1, 2, tissue)
    names = ("wm", "gm", "csf")
    image = np.stack([np.choose(tissue, [TISSUE[n][m] for n in names]) for m in range(4)]).astype(np.float32)

    # tumour: a distorted ellipsoid somewhere inside the brain; d < 1 is the tumour core
    hgg = grade == "HGG"
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = direction * rng.uniform(0.1, 0.5) * semi
    radius = rng.uniform(0.13, 0.30) if hgg else rng.uniform(0.10, 0.26)
    radii = radius * rng.uniform(0.8, 1.2, 3) * semi
    d = np.sqrt(
        ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    )
    d = d * (1 + (0.22 if hgg else 0.10) * _smooth_field(rng, shape, 8))
    edema_extent = rng.uniform(1.5, 2.4) if hgg else rng.uniform(1.05, 1.45)
    seg = np.zeros(shape, np.uint8)
    seg[(d < edema_extent) & brain] = 2
    core = (d < 1) & brain
    if hgg:
        rim = rng.uniform(0.6, 0.8) if rng.random() > 0.15 else rng.uniform(0.85, 0.95)  # some enhance thinly
        seg[core & (d >= rim)] = 4
        seg[core & (d < rim)] = 1
        enhance = 1.0 if rim < 0.85 else rng.uniform(0.2, 0.5)
    else:
        seg[core] = 1
        enhance = 0.0
        if rng.random() < 0.2:  # an enhancing focus inside some LGG
            focus = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) < (0.3 * radius) ** 2
            seg[focus & core] = 4
            enhance = rng.uniform(0.3, 0.7)
    for label, name in ((2, "edema"), (1, "necrosis" if hgg else "lgg_core"), (4, "enhancing")):
        where = seg == label
        for m in range(4):
            value = TISSUE[name][m]
            if name == "enhancing" and m == 1:  # T1ce rim brightness follows the enhancement strength
                value = TISSUE["lgg_core"][1] + enhance * (value - TISSUE["lgg_core"][1])
            image[m][where] = value
    if hgg:  # heterogeneous tumour texture
        texture = 1 + 0.12 * _smooth_field(rng, shape, 20)
        image[:, seg > 0] *= texture[seg > 0]

    if imprint is not None:
        image *= imprint
    images, seg = {}, np.where(brain, seg, 0).astype(np.uint8)
    for m, modality in enumerate(MODALITIES):
        bias = np.exp(0.12 * _smooth_field(rng, shape, 3))
        noisy = image[m] * bias + rng.normal(0, 0.03, shape).astype(np.float32)
        scale = rng.uniform(400, 4000)
        vol = np.where(brain, np.clip(np.rint(noisy * scale), 1, 32767), 0)
        images[modality] = vol.astype(np.int16)
    return images, seg


def scanner_imprint(site: str, shape, seed: int) -> np.ndarray:
    """The multiplicative scanner imprint of `site` on the grid (signal="site"): a smooth log-normal field,
    exp(SCANNER_GAIN x a unit-variance field varying over about a third of the volume), drawn from a stream of the
    set's seed and the site's name alone. Never from the site's grade: sites of one grade share no direction, sign or
    pattern except by chance, so nothing learnt on some sites carries over to a site a network never saw."""
    stream = np.random.SeedSequence([seed, zlib.crc32(site.encode()), 0x5CA77E])
    field = _smooth_field(np.random.default_rng(stream), tuple(int(v) for v in shape), 3)
    return np.exp(SCANNER_GAIN * field / max(float(field.std()), 1e-6)).astype(np.float32)


def synthetic_plan(
    n_cases: int, hgg_fraction: float, seed: int, first: int = 0, signal: str = "grade"
) -> list[tuple[str, str, str]]:
    """(case id, grade = label and folder, appearance grade the phantom is drawn with) for each case of a set.

    Ids and labels do not depend on `signal` except for the sites of signal="site"; the appearance grade is the
    label for "grade", and an independent shuffle of the labels (its own random stream) for "none" and "site".
    """
    if signal not in SIGNALS:
        raise DataError(f"--signal {signal!r}: choose one of {', '.join(SIGNALS)}")
    if n_cases < 2:
        raise DataError(f"--cases {n_cases}: at least 2 cases are needed (one per grade)")
    if not 0 < hgg_fraction < 1:
        raise DataError(f"--hgg-fraction {hgg_fraction} must lie strictly between 0 and 1")
    n_hgg = min(max(round(n_cases * hgg_fraction), 1), n_cases - 1)
    rng = np.random.default_rng(seed)
    grades = np.array(["HGG"] * n_hgg + ["LGG"] * (n_cases - n_hgg))
    rng.shuffle(grades)
    if signal == "site":  # each grade's cases spread evenly over that grade's own sites
        sites = np.empty(n_cases, dtype=object)
        for grade, names in SITE_SIGNAL_SITES.items():
            rows = np.flatnonzero(grades == grade)
            sites[rows] = rng.permutation(np.resize(np.array(names), len(rows)))
    else:
        sites = rng.choice(SITES, n_cases)
    if signal == "grade":
        looks = grades
    else:  # a stream of its own: the labels' draws (and so the ids and folders) stay those of signal="grade"
        looks = np.random.default_rng(np.random.SeedSequence([seed, 0x51C7A1])).permutation(grades)
    return [(f"Brats18_{sites[i]}_{first + i:04d}_1", str(grades[i]), str(looks[i])) for i in range(n_cases)]


def _write_case(args) -> str:
    folder, case_id, grade, shape, seed, index, *rest = args
    import torch

    torch.set_num_threads(1)
    look = rest[0] if rest else grade
    imprint = scanner_imprint(case_id.split("_")[1], shape, seed) if len(rest) > 1 and rest[1] == "site" else None
    images, seg = synth_case(look, shape, np.random.SeedSequence([seed, index]), imprint)
    case_dir = Path(folder) / grade / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(shape)
    for name, arr in [*images.items(), ("seg", seg)]:
        img = nib.Nifti1Image(arr, affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(case_dir / f"{case_id}_{name}.nii.gz"))
    return case_id


# --target NAME: the second question follows the phantom's look (what an image can answer), with this share of cases
# flipped at random, so that it is learnable and yet not the grade itself
TARGET_FLIP = 0.15
COHORT_TABLE = "cohort.csv"


def second_target(looks: list[str], seed: int) -> list[str]:
    """'positive' or 'negative' per case: positive where the phantom looks high-grade, TARGET_FLIP of them flipped
    (a stream of its own: the ids, grades and images are those of the set without --target)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A26E7]))
    flip = rng.random(len(looks)) < TARGET_FLIP
    return ["positive" if (look == "HGG") != f else "negative" for look, f in zip(looks, flip, strict=True)]


def write_cohort_table(folder: Path, cases: list[tuple], name: str, values: list[str]) -> None:
    """folder/cohort.csv: id, patient, site, grade, <name>, the four modality files (relative to the folder)."""
    import csv

    with (folder / COHORT_TABLE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "patient", "site", "grade", name, *MODALITIES])
        for (cid, grade, _), value in zip(cases, values, strict=True):
            files = [f"{grade}/{cid}/{cid}_{m}.nii.gz" for m in MODALITIES]
            w.writerow([cid, cid, cid.split("_")[1], grade, value, *files])


def synthesize(
    out: str | Path,
    n_cases: int,
    shape=BRATS_SHAPE,
    seed: int = 42,
    hgg_fraction: float = BRATS2018_HGG_FRACTION,
    workers: int | None = None,
    progress: bool = True,
    first_index: int = 0,
    signal: str = "grade",
    target: str | None = None,
) -> tuple[Path, bool]:
    """Write `n_cases` phantoms under out/HGG and out/LGG; returns (out, reused). Case numbers start at
    `first_index` (a second set with a higher start has ids no case of the first set has). `signal` says what
    predicts the grade: "grade" (the tumour's look), "none" (nothing) or "site" (the site only); see the module.
    `target`: also write cohort.csv, a cohort table with a second binary column of that name (`second_target`).

    A folder already holding the same synthetic set (same parameters) is reused; any other non-empty folder is
    refused. The set is written in a temporary sibling folder and renamed into place.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise DataError(f"--shape {shape}: three sizes of at least 16 voxels are needed")
    params = {
        "cases": n_cases,
        "shape": list(shape),
        "seed": seed,
        "hgg_fraction": hgg_fraction,
        "version": 1,
        **({"first_index": first_index} if first_index else {}),
        **({"signal": signal} if signal != "grade" else {}),  # the default's record is that of earlier versions
        **({"scanner_imprint": {"field": "log-normal", "sd": SCANNER_GAIN, "version": 2}} if signal == "site" else {}),
        **({"target": target, "target_flip": TARGET_FLIP} if target else {}),
    }
    cases = synthetic_plan(n_cases, hgg_fraction, seed, first_index, signal)
    if out.exists() and any(out.iterdir()):
        try:
            if json.loads((out / RECORD).read_text()) == params:
                return out, True
        except (OSError, ValueError):
            pass
        raise DataError(f"{out} exists and is not empty (and is not this synthetic set); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    jobs = [(str(tmp), cid, grade, shape, seed, i, look, signal) for i, (cid, grade, look) in enumerate(cases)]
    workers = max(1, min(workers or os.cpu_count() or 1, n_cases))
    try:
        with tqdm(total=n_cases, desc="synth", unit="case", disable=not progress) as bar:
            if workers == 1:
                for job in jobs:
                    _write_case(job)
                    bar.update()
            else:
                import multiprocessing as mp

                with ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver")) as pool:
                    for _ in pool.map(_write_case, jobs):
                        bar.update()
        for grade in GRADES:
            (tmp / grade).mkdir(exist_ok=True)
        if target:
            write_cohort_table(tmp, cases, target, second_target([look for _, _, look in cases], seed))
        (tmp / RECORD).write_text(json.dumps(params))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, False
