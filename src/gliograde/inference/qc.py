"""Input quality of a case to predict, against what the ensemble was trained on.

Flags (each case's `qc.flags`, in predictions.json/csv of `predict` and in every output of `validate`):

- spacing_not_1mm: a voxel edge in the NIfTI header differs from 1 mm (BraTS volumes are resampled to 1 mm);
- grid_not_brats: the voxel grid is not BraTS's 240 x 240 x 155;
- brain_fraction_out_of_range: the share of brain (non-zero) voxels of the preprocessed volume lies outside the
  range of the training cache's volumes (an image that is not skull-stripped fills its whole crop);
- negative_intensities: the raw image holds negative values (not skull-stripped with the BraTS tools, whose
  background is exactly 0, or resampled with an interpolator that overshoots);
- out_of_distribution: in the ensemble's pooled features (`model.forward_features`) the case lies farther from its
  fold member's training patients than all but 5 % of the training cohort's patients that member never fitted on
  (a split-conformal threshold), for the majority of the members (`OOD_METHOD`). With fewer than 19 such patients
  per member no case can reach 5 %: the check says "not enough training patients to judge" instead of flagging;
- seen_in_training: the ensemble was trained on this patient (the same case id, BraTS year prefix aside, or the same
  preprocessed image): its P(HGG) is no prediction on a new patient.

The reference (training ids, image hashes, brain-fraction range, features) is computed from the runs' cache
(`volumes.npy`) and kept in the cache folder's `qc_reference/` (best effort, one small file for the hashes and
fractions and one per checkpoint for the features, each keyed by the path, size and time of what it was computed
from), so that later commands read it back; without the cache only the header checks are made, and the JSON says
which checks were not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gliograde.data.brats import Case
from gliograde.errors import DataError

log = logging.getLogger("gliograde")

BRATS_GRID = (240, 240, 155)
SPACING_TOLERANCE_MM = 0.01
OOD_ALPHA = 0.05  # the share of new patients of the training distribution a member may flag
OOD_K = 5
OOD_MIN_CALIBRATION = int(np.ceil(1 / OOD_ALPHA)) - 1  # below it no p-value reaches OOD_ALPHA
NOT_ENOUGH = "not enough training patients to judge"
FLAGS = {
    "spacing_not_1mm": "voxel spacing is not 1 mm",
    "grid_not_brats": "voxel grid is not BraTS-like (240 x 240 x 155)",
    "brain_fraction_out_of_range": "brain fraction of the preprocessed volume outside the training range",
    "negative_intensities": "negative intensities in the raw image (not skull-stripped with the BraTS tools, or "
    "resampled)",
    "out_of_distribution": "out of distribution: far from the training patients in the ensemble's features",
    "seen_in_training": "the ensemble was trained on this patient (same case id or same image): its P(HGG) is no "
    "prediction on a new patient",
}
OOD_METHOD = (
    f"mean Euclidean distance to the {OOD_K} nearest training patients in the pooled features "
    "(model.forward_features, no test-time augmentation), centred on the training patients' mean and divided by one "
    "scale, their RMS distance from it (not per feature: with few patients a near-constant feature makes every new "
    "patient an outlier); per fold member, the reference is the patients its network fitted on. Calibration (split "
    "conformal): the distances of the fold's patients the member never fitted on (selection and validation parts); "
    f"with fewer than {OOD_MIN_CALIBRATION} of them, also each training patient's distance to the others, left out of "
    "the mean and scale. The member's p-value is (1 + calibration patients at least as far) / (n + 1), its threshold "
    f"the distance where that reaches {OOD_ALPHA:g}: a member flags at most {OOD_ALPHA:.0%} of new patients of the "
    "training distribution. A case is out of distribution when the majority of the members put it above their "
    f"threshold. With fewer than {OOD_MIN_CALIBRATION} calibration patients per member no p-value reaches "
    f"{OOD_ALPHA:g}: the check reports '{NOT_ENOUGH}' and flags nothing"
)
BRAIN_FRACTION_METHOD = (
    "share of voxels non-zero in any modality in the preprocessed (cropped, cubed, resized) volume; the range is the "
    "minimum and maximum over the training cache's volumes"
)


REFERENCE_DIR = "qc_reference"  # inside the cache folder: hashes, brain fractions and features, keyed by their inputs
REFERENCE_VERSION = 1


def _stamp(path: str | Path) -> list:
    """What a saved reference depends on: the file's absolute path, size and modification time."""
    st = Path(path).stat()
    return [str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns)]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load(path: Path, key: dict) -> dict | None:
    """The arrays saved at `path` if they were saved for this `key`, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != json.loads(json.dumps(key)):
                return None
            return {k: z[k] for k in z.files if k != "key"}
    except (OSError, ValueError, KeyError):
        return None


def _save(path: Path, key: dict, **arrays) -> None:
    """Best effort (a read-only cache is fine): written to a temporary sibling, then renamed into place."""
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:8]}.npz")
        np.savez(tmp, key=np.array(json.dumps(key)), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("QC reference not saved in %s (%s); it is recomputed next time", path.parent, e)


def volume_hash(volume: np.ndarray) -> str:
    """sha256 of a preprocessed volume rounded to float16 (the cache's dtype), C order: the same image under any id."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(volume, dtype=np.float16)).tobytes()).hexdigest()


def brain_fraction(volume: np.ndarray) -> float:
    return float(np.mean(np.any(np.asarray(volume) != 0, axis=0)))


def header_checks(case: Case) -> dict:
    """Spacing and grid from the NIfTI headers, and the minimum raw intensity over the four modalities."""
    spacing, grid, minimum = None, None, None
    for path in case.files:
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
        except Exception as e:  # nibabel raises many types for bad files
            raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
        if spacing is None:
            spacing = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
            grid = [int(s) for s in img.shape[:3]]
        low = float(np.min(data))
        minimum = low if minimum is None else min(minimum, low)
    return {"spacing_mm": spacing, "grid": grid, "min_intensity": minimum}


@dataclass
class MemberReference:
    """One fold member's training patients in its feature space, its calibration scores and its distance threshold.

    Features are centred on the training patients' mean and divided by ONE scale (their RMS distance from it), not
    standardized per feature: with a few dozen patients, a feature almost constant among them turns any new patient
    into an outlier (measured: thresholds of 60-300 against leave-one-out distances near 30)."""

    name: str
    mean: np.ndarray
    scale: float
    train: np.ndarray  # (n, F) centred, scaled features of the fold's training rows
    k: int
    scores: np.ndarray  # calibration: distances of patients of the cohort, each scored without itself in the reference
    calibration: str  # which patients `scores` come from
    threshold: float | None  # None: too few calibration patients to reach OOD_ALPHA
    heldout_flag_rate: float | None  # share of the fold's held-out patients above the threshold fitted without them

    @classmethod
    def fit(
        cls, name: str, train: np.ndarray, heldout: np.ndarray | None, unseen: np.ndarray | None = None
    ) -> MemberReference:
        """`train`: the patients the network fitted on; `heldout` (the fold's validation part) and `unseen` (its
        selection part): patients of the same cohort it never trained on, whose distances calibrate the threshold
        (split conformal). Where they are fewer than OOD_MIN_CALIBRATION, each training patient's distance to the
        others (its features left out of the mean and scale too) is added."""
        train = np.asarray(train, dtype=np.float64)
        parts = [np.asarray(a, dtype=np.float64) for a in (heldout, unseen) if a is not None and len(a)]
        held = np.concatenate(parts) if parts else np.zeros((0, train.shape[1]))
        ref = _reference(name, train)
        scores = np.array([ref.distance(f) for f in held])
        ref.calibration = f"{len(held)} held-out patient(s) of the training cohort"
        if len(held) < OOD_MIN_CALIBRATION and len(train) > 2:
            loo = [_reference(name, np.delete(train, i, axis=0)).distance(train[i]) for i in range(len(train))]
            scores = np.concatenate([scores, loo])
            ref.calibration += f" + {len(train)} training patient(s), each left out of the reference"
        ref.scores, ref.threshold = scores, conformal_threshold(scores)
        n_heldout = 0 if heldout is None else len(heldout)
        if n_heldout:  # scores[:n_heldout] are the fold's own validation patients
            rest = [conformal_threshold(np.delete(scores, i)) for i in range(n_heldout)]
            if all(t is not None for t in rest):
                ref.heldout_flag_rate = float(np.mean([scores[i] > rest[i] for i in range(n_heldout)]))
        return ref

    def distance(self, features: np.ndarray) -> float:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        d = np.sqrt(((self.train - z) ** 2).sum(1))
        return float(np.sort(d)[: self.k].mean())

    def p_value(self, distance: float) -> float:
        """Conformal p-value: the share of calibration patients at least as far, counting the case itself."""
        return float((1 + np.sum(self.scores >= distance)) / (len(self.scores) + 1))


def _reference(name: str, train: np.ndarray) -> MemberReference:
    """The patients `train` as a reference, without calibration."""
    mean = train.mean(0)
    scale = float(np.sqrt(((train - mean) ** 2).sum(1).mean()))
    scale = scale if scale > 1e-12 else 1.0  # identical patients: any scale
    k = max(1, min(OOD_K, len(train)))
    return MemberReference(name, mean, scale, (train - mean) / scale, k, np.zeros(0), "", None, None)


def conformal_threshold(scores: np.ndarray, alpha: float = OOD_ALPHA) -> float | None:
    """The distance above which a case's conformal p-value is at most `alpha`: the m-th largest calibration score,
    m = floor(alpha (n + 1)); None when n + 1 < 1 / alpha (no case could reach alpha)."""
    m = int(np.floor(alpha * (len(scores) + 1) + 1e-9))
    if m < 1:
        return None
    return float(np.sort(scores)[::-1][m - 1])


@torch.no_grad()
def member_features(members, x: torch.Tensor) -> list[np.ndarray]:
    """Each member's pooled features of a batch (B, C, S, S, S), float32, no augmentation."""
    out = []
    for m in members:
        m.model.eval()
        out.append(m.model.forward_features(x.float()).float().cpu().numpy().astype(np.float64))
    return out


def plain_id(case_id: str) -> str:
    """A case id without its BraTS year prefix (Brats18_2013_3_1 and BraTS19_2013_3_1 are one patient)."""
    return re.sub(r"^brats\d{2}_", "", case_id.strip().lower())


def _run_record(member) -> dict:
    try:
        return json.loads((Path(member.checkpoint).parent.parent / "config" / "config.json").read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class TrainingReference:
    """What the ensemble was trained on: ids, image hashes, brain-fraction range and per-member features."""

    cache: object | None  # gliograde.data.cache.VolumeCache
    ids: set[str]
    splits: list[dict]  # per member: {"fit", "select", "val"} ids (empty where not recorded)
    hashes: dict[str, str] | None = None  # hash -> training case id
    fraction_range: tuple[float, float] | None = None
    members: list[MemberReference] | None = None
    missing: dict[str, str] = field(default_factory=dict)  # check -> why it was not made

    @classmethod
    def of(cls, members) -> TrainingReference:
        """The training ids from the runs' records (config.json "split") and their cache (cases.csv)."""
        from gliograde.data.cache import open_cache

        records = [_run_record(m) for m in members]
        splits = [r.get("split") or {} for r in records]
        ids = {i for s in splits for part in s.values() for i in part}
        cache, why = None, "no run records the cache it was trained on (config.json cache_dir)"
        for r in records:
            path = (r.get("config") or {}).get("cache_dir")
            if not path:
                continue
            try:
                cache = open_cache(path)
                break
            except DataError as e:
                why = f"the runs' cache cannot be opened ({e})"
        ref = cls(cache, ids, splits)
        if cache is None:
            for check in ("image_hash", "brain_fraction", "out_of_distribution"):
                ref.missing[check] = why
            log.warning("QC and leakage check without the training cache: %s", why)
        else:
            ref.ids |= set(cache.ids)
        return ref

    def cache_params(self) -> dict | None:
        return (self.cache.manifest.get("params") or {}) if self.cache is not None else None

    def ensure_hashes(self) -> None:
        """One pass over the cache: each volume's hash and brain fraction (kept in the cache's qc_reference/)."""
        if self.hashes is not None or self.cache is None:
            return
        key = {"volumes": _stamp(self.cache.path / "volumes.npy"), "version": REFERENCE_VERSION}
        saved = _load(self.cache.path / REFERENCE_DIR / "volumes.npz", key)
        if saved is not None and len(saved["hashes"]) == len(self.cache.ids):
            hashes, fractions = [str(h) for h in saved["hashes"]], saved["fractions"]
        else:
            hashes, fractions = [], []
            for i in range(len(self.cache.ids)):
                v = np.asarray(self.cache.volumes[i])
                hashes.append(volume_hash(v))
                fractions.append(brain_fraction(v))
            fractions = np.asarray(fractions, dtype=np.float64)
            _save(self.cache.path / REFERENCE_DIR / "volumes.npz", key, hashes=np.array(hashes), fractions=fractions)
        self.hashes = {}
        for h, cid in zip(hashes, self.cache.ids, strict=True):
            self.hashes.setdefault(h, cid)
        self.fraction_range = (float(np.min(fractions)), float(np.max(fractions)))

    def ensure_features(self, members, device: torch.device, batch: int = 8) -> None:
        """Each member's features of every cache volume (kept in the cache's qc_reference/, one file per
        checkpoint), then its reference on the fold's own training rows."""
        if self.members is not None or self.cache is None:
            return
        cache, ref = self.cache, members[0]
        if cache.size != ref.size:
            self.missing["out_of_distribution"] = f"the cache is {cache.size}^3, the models take {ref.size}^3"
            return
        row = {cid: i for i, cid in enumerate(cache.ids)}
        channels = cache.channels(ref.modalities)
        start = time.perf_counter()
        volumes = _stamp(cache.path / "volumes.npy")
        keys = [{"volumes": volumes, "checkpoint": _stamp(m.checkpoint), "channels": channels,
                 "version": REFERENCE_VERSION} for m in members]  # fmt: skip
        files = [cache.path / REFERENCE_DIR / f"features_{_digest(k['checkpoint'][0])}.npz" for k in keys]
        feats = [(_load(f, k) or {}).get("features") for f, k in zip(files, keys, strict=True)]
        todo = [j for j, f in enumerate(feats) if f is None or len(f) != len(cache.ids)]
        if todo:
            parts = {j: [] for j in todo}
            for lo in range(0, len(cache.ids), batch):
                x = np.asarray(cache.volumes[lo : lo + batch][:, channels], dtype=np.float32)
                x = torch.from_numpy(x).to(device)
                for j, f in zip(todo, member_features([members[j] for j in todo], x), strict=True):
                    parts[j].append(f.astype(np.float32))
            for j in todo:
                feats[j] = np.concatenate(parts[j])
                _save(files[j], keys[j], features=feats[j])
        feats = [np.asarray(f, dtype=np.float64) for f in feats]
        out = []
        for j, m in enumerate(members):
            split = self.splits[j] if j < len(self.splits) else {}
            fit = [row[i] for i in split.get("fit", []) if i in row]
            select = [row[i] for i in split.get("select", []) if i in row]
            val = [row[i] for i in split.get("val", []) if i in row]
            if len(fit) < 2:  # a bare checkpoint without a split record: all cache rows are its training rows
                fit, select, val = list(range(len(cache.ids))), [], []
            name = f"fold_{m.fold}" if m.fold is not None else str(Path(m.checkpoint).parent.parent.name)
            out.append(MemberReference.fit(name, feats[j][fit], feats[j][val] if val else None,
                                           feats[j][select] if select else None))  # fmt: skip
        self.members = out
        short = [r for r in out if r.threshold is None]
        if short:
            self.missing["out_of_distribution"] = (
                f"{NOT_ENOUGH}: {len(short[0].scores)} calibration patient(s) per member ({short[0].calibration}); "
                f"at least {OOD_MIN_CALIBRATION} are needed before a {OOD_ALPHA:.0%} false-positive rate can be held"
            )
            log.warning("out-of-distribution check: %s", self.missing["out_of_distribution"])
        log.info("QC reference: %d training volumes x %d model(s) in %.1f s", len(cache.ids), len(members),
                 time.perf_counter() - start)  # fmt: skip

    def describe(self) -> dict:
        """The methods and the reference's figures, for the JSON."""
        return {
            "flags": FLAGS,
            "spacing": f"NIfTI header zooms; flagged when an edge differs from 1 mm by more than "
            f"{SPACING_TOLERANCE_MM} mm",
            "grid": f"NIfTI shape; flagged when not {' x '.join(map(str, BRATS_GRID))}",
            "negative_intensities": "minimum raw voxel value (after the header's scaling) below 0 in any modality",
            "brain_fraction": BRAIN_FRACTION_METHOD,
            "brain_fraction_range": list(self.fraction_range) if self.fraction_range else None,
            "out_of_distribution": OOD_METHOD,
            "members": [
                {
                    "name": r.name,
                    "k": r.k,
                    "threshold": r.threshold,
                    "training_patients": len(r.train),
                    "calibration_patients": len(r.scores),
                    "calibration": r.calibration,
                    "heldout_flag_rate": r.heldout_flag_rate,
                }
                for r in self.members or []
            ],
            "not_checked": dict(self.missing),
            "cache": str(self.cache.path) if self.cache is not None else None,
        }

    def training_id(self, case_id: str) -> str | None:
        """The training case with this id (the BraTS year prefix aside), or None."""
        if case_id in self.ids:
            return case_id
        return next((i for i in sorted(self.ids) if plain_id(i) == plain_id(case_id)), None)

    def ood(self, features: list[np.ndarray]) -> dict:
        """Each member's distance, threshold and conformal p-value of one case (features: (1, F) per member), and
        the verdict: "out of distribution", "in distribution" or NOT_ENOUGH."""
        per = {}
        for r, f in zip(self.members, features, strict=True):
            d = r.distance(f[0])
            per[r.name] = {"distance": d, "threshold": r.threshold, "p_value": r.p_value(d)}
        above = sum(v["threshold"] is not None and v["distance"] > v["threshold"] for v in per.values())
        if any(v["threshold"] is None for v in per.values()):
            verdict = NOT_ENOUGH
        else:
            verdict = "out of distribution" if above > len(per) / 2 else "in distribution"
        return {"verdict": verdict, "members_above": above, "members": len(per), "alpha": OOD_ALPHA,
                "per_member": per}  # fmt: skip

    def check(self, case: Case, volume: np.ndarray, features: list[np.ndarray] | None, params: dict | None) -> dict:
        """The QC record of one case: its flags (names of FLAGS) and the figures behind them. `volume`: the case
        preprocessed with `params` (size, margin); its hash is compared with the cache's where they match."""
        h = header_checks(case)
        flags = []
        if any(abs(z - 1.0) > SPACING_TOLERANCE_MM for z in h["spacing_mm"]):
            flags.append("spacing_not_1mm")
        if tuple(h["grid"]) != BRATS_GRID:
            flags.append("grid_not_brats")
        record = {**h, "brain_fraction": brain_fraction(volume)}
        if self.fraction_range is not None:
            lo, hi = self.fraction_range
            if not lo <= record["brain_fraction"] <= hi:
                flags.append("brain_fraction_out_of_range")
        if h["min_intensity"] < 0:
            flags.append("negative_intensities")
        cp = self.cache_params()
        if self.hashes is not None and cp and params and all(cp.get(k) == params.get(k) for k in ("size", "margin")):
            record["same_image_as_training_case"] = self.hashes.get(volume_hash(volume))
        record["same_id_as_training_case"] = self.training_id(case.id)
        seen = record["same_id_as_training_case"] or record.get("same_image_as_training_case")
        if seen:
            flags.append("seen_in_training")
            log.warning("case %s: the ensemble was trained on this patient (training case %s); its P(HGG) is no "
                        "prediction on a new patient", case.id, seen)  # fmt: skip
        if self.members and features is not None:
            record["ood"] = self.ood(features)
            if record["ood"]["verdict"] == "out of distribution":
                flags.append("out_of_distribution")
                log.warning("case %s: out of distribution (%d of %d ensemble members put it above their threshold)",
                            case.id, record["ood"]["members_above"], record["ood"]["members"])  # fmt: skip
        record["flags"] = flags
        return record


def flag_summary(records: list[dict]) -> dict:
    """Per flag: how many cases carry it, and which."""
    out = {}
    for name in FLAGS:
        cases = [r["case"] for r in records if name in ((r.get("qc") or {}).get("flags") or [])]
        out[name] = {"n": len(cases), "cases": cases, "meaning": FLAGS[name]}
    return out
