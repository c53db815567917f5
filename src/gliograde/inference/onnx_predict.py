"""Predicting with exported ONNX models (`gliograde export --format onnx`): onnxruntime and numpy only.

This module never imports torch, the networks or the training code: a deployment needs only onnxruntime, numpy
and the sidecars. Each member's P(HGG) is softmax(logit_scale x logits)[:, 1] at its run's operating point (the
same arithmetic as `gliograde.evaluation.calibration.OperatingPoint.apply`: logit(p) + logit(train_prior) -
logit(sampled_prior), then / temperature in logit space); the ensemble's P(HGG) is the mean of the members', its
threshold the mean of their thresholds (as `gliograde predict`).

`predict_exported` takes volumes already preprocessed as the training cache was. `predict_cases_onnx` prepares
NIfTI cases itself with `gliograde.data.preprocess.preprocess_case` (nibabel and numpy: the same volumes as the
training cache holds, without torch), so `gliograde predict --onnx` runs where torch is not installed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from gliograde import MODALITIES, __version__
from gliograde.errors import GliogradeError
from gliograde.files import write_json
from gliograde.inference.records import decision_text, write_predictions_csv

log = logging.getLogger("gliograde")
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before a logit (gliograde.evaluation.stats.logit)


class ExportedModelError(GliogradeError, ValueError):
    """An exported model folder or sidecar that cannot be used as it is, or an input it does not fit."""


@dataclass
class ExportedMember:
    """One exported model: its sidecar and its onnxruntime session."""

    name: str
    sidecar: Path
    meta: dict
    session: Any

    @property
    def channels(self) -> list[str]:
        return list(self.meta["channels"])

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def logit_scale(self) -> float:
        return float(self.meta.get("logit_scale", 1.0))

    @property
    def point(self) -> dict | None:
        return self.meta.get("operating_point")

    @property
    def threshold(self) -> float:
        return float(self.point["threshold"]) if self.point else 0.5


def _logit(p) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def _prior_logit(value, what: str) -> float:
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ExportedModelError(f"the operating point's {what} {v} must lie strictly between 0 and 1")
    return float(np.log(v) - np.log1p(-v))


def apply_point(raw, point: dict | None) -> np.ndarray:
    """Raw softmax P(HGG) -> P(HGG) at the operating point (`OperatingPoint.apply`); None: unchanged."""
    p = np.asarray(raw, dtype=np.float64)
    if not point:
        return p
    shift = _prior_logit(point["train_prior"], "train_prior") - _prior_logit(point["sampled_prior"], "sampled_prior")
    p = _sigmoid(_logit(p) + shift)
    t = float(point.get("temperature", 1.0))
    if t != 1.0:
        if not (np.isfinite(t) and t > 0):
            raise ExportedModelError(f"the operating point's temperature must be finite and > 0, got {t}")
        p = _sigmoid(_logit(p) / t)
    return p


def _softmax_hgg(logits: np.ndarray, scale: float) -> np.ndarray:
    z = scale * np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def load_exported(folder: str | Path, providers: list[str] | None = None) -> list[ExportedMember]:
    """The exported ONNX models of a folder (every `<name>.json` sidecar with its `<name>.onnx`), checked to take
    the same input (channels, size, preprocessing)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportedModelError(
            "predicting with ONNX models needs onnxruntime (pip install 'gliograde[export]')"
        ) from e
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportedModelError(f"{folder} is not a folder of exported models")
    members = []
    for sidecar in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise ExportedModelError(f"{sidecar} cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or "format" not in meta:
            continue  # not a sidecar (predictions.json and the like)
        missing = [k for k in ("file", "channels", "size", "classes") if k not in meta]
        if missing:
            raise ExportedModelError(f"{sidecar} is not an export sidecar (no {', '.join(missing)})")
        if meta["format"] != "onnx":
            raise ExportedModelError(
                f"{sidecar} describes a {meta['format']} export; this predictor runs ONNX models (load a TorchScript "
                "file with torch.jit.load)"
            )
        if not (isinstance(meta["classes"], list) and len(meta["classes"]) == 2):
            raise ExportedModelError(f"{sidecar}: classes {meta['classes']}, expected the names of labels 0 and 1")
        model = folder / meta["file"]
        if not model.is_file():
            raise ExportedModelError(f"{sidecar} names {model}, which does not exist")
        session = ort.InferenceSession(str(model), providers=providers or ["CPUExecutionProvider"])
        members.append(ExportedMember(meta.get("name") or sidecar.stem, sidecar, meta, session))
    if not members:
        raise ExportedModelError(f"no exported ONNX models (sidecar .json + .onnx) in {folder}")
    ref = members[0]
    for m in members[1:]:
        for what in ("model_kind", "channels", "size", "preprocess", "classes"):
            if ref.meta.get(what) != m.meta.get(what):
                raise ExportedModelError(
                    f"the exported models disagree on {what}: {ref.sidecar} has {ref.meta.get(what)}, {m.sidecar} has "
                    f"{m.meta.get(what)}; an ensemble needs models trained on the same input"
                )
    return members


def check_compatible(members: list[ExportedMember], channels: list[str], size: int) -> None:
    """ValueError (ExportedModelError) naming the sidecar when a model does not take inputs of these channels (in
    this order) and this size."""
    for m in members:
        if list(m.channels) != list(channels):
            raise ExportedModelError(
                f"{m.sidecar}: the model takes channels {m.channels} (in this order), the input has {list(channels)}"
            )
        if m.size != int(size):
            raise ExportedModelError(f"{m.sidecar}: the model takes size {m.size}^3 volumes, but the input is {size}^3")


def predict_exported(members: list[ExportedMember], volumes: np.ndarray) -> dict:
    """P(HGG) of preprocessed volumes (N, C, S, S, S): per member (raw and at its operating point) and for the
    ensemble (mean of the members' calibrated probabilities vs the mean of their thresholds)."""
    x = np.ascontiguousarray(volumes, dtype=np.float32)
    ref = members[0]
    if x.ndim != 5 or x.shape[1] != len(ref.channels) or x.shape[2:] != (ref.size,) * 3:
        raise ExportedModelError(
            f"{ref.sidecar}: expected volumes of shape (N, {len(ref.channels)}, {ref.size}, {ref.size}, {ref.size}) "
            f"(channels {ref.channels}), got {tuple(x.shape)}"
        )
    raw, calibrated = {}, {}
    for m in members:
        inp = m.meta.get("input", {}).get("name", "volume")
        out = m.meta.get("output", {}).get("name", "logits")
        logits = m.session.run([out], {inp: x})[0]
        raw[m.name] = _softmax_hgg(logits, m.logit_scale)
        calibrated[m.name] = apply_point(raw[m.name], m.point)
    p = np.mean(list(calibrated.values()), axis=0)
    threshold = float(np.mean([m.threshold for m in members]))
    return {
        "p_hgg": p,
        "p_hgg_raw": np.mean(list(raw.values()), axis=0),
        "threshold": threshold,
        "predicted_grade": [ref.meta["classes"][int(v >= threshold)] for v in p],
        "classes": list(ref.meta["classes"]),
        "members": calibrated,
        "members_raw": raw,
    }


def _output_dir(out: str | Path) -> Path:
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise ExportedModelError(f"--out {path} already holds files; choose a new folder (nothing is overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def predict_cases_onnx(cases: list, folder: str | Path, out: str | Path) -> list[dict]:
    """Preprocess NIfTI cases as the training cache was (the sidecars' parameters), predict them with the exported
    ensemble of `folder`, write predictions.csv/.json into the new or empty `out`, return the records.
    The preprocessing is the data layer's (`gliograde.data.preprocess`: nibabel and numpy, no torch)."""
    from gliograde.data.brats import UNKNOWN_GRADE
    from gliograde.data.preprocess import DEFAULT_MARGIN, PREPROCESS_VERSION, preprocess_case

    members = load_exported(folder)
    out = _output_dir(out)
    repeated = sorted({c.id for c in cases if [d.id for d in cases].count(c.id) > 1})
    if repeated:
        raise ExportedModelError(f"case id(s) {repeated} given twice; their outputs would overwrite each other")
    ref = members[0]
    pre = ref.meta.get("preprocess") or {}
    version = pre.get("preprocess_version")
    if version != PREPROCESS_VERSION:
        raise ExportedModelError(
            f"{ref.sidecar}: the model was trained on volumes of preprocessing version {version}, but this gliograde "
            f"preprocesses with version {PREPROCESS_VERSION}; new cases would not be prepared as in training"
        )
    unknown = [c for c in ref.channels if c not in MODALITIES]
    if unknown:
        raise ExportedModelError(f"{ref.sidecar}: unknown channels {unknown} (known: {list(MODALITIES)})")
    channels = [MODALITIES.index(c) for c in ref.channels]
    names = [m.name for m in members]
    records, failed = [], {}
    for case in cases:
        try:
            volume, _ = preprocess_case(case, ref.size, pre.get("margin", DEFAULT_MARGIN))
        except GliogradeError as e:
            log.error("case %s: %s", case.id, e)
            failed[case.id] = str(e)
            continue
        res = predict_exported(members, volume[channels].astype(np.float32)[None])
        p = float(res["p_hgg"][0])
        record = {
            "case": case.id,
            "p_hgg": p,
            "p_hgg_raw": float(res["p_hgg_raw"][0]),
            "threshold": res["threshold"],
            "predicted_grade": res["predicted_grade"][0],
            "true_grade": case.grade if case.grade != UNKNOWN_GRADE and case.grade in res["classes"] else None,
            "classes": res["classes"],
            "folds": {n: float(res["members"][n][0]) for n in names},
        }
        records.append(record)
        log.info("%s", decision_text(record))  # with the threshold: it is fitted, rarely 0.5
    write_predictions_csv(out, records, names)
    import onnxruntime

    meta = {
        "gliograde": __version__,
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "created": datetime.now().isoformat(timespec="seconds"),
        "ensemble": [{"name": m.name, "sidecar": str(m.sidecar), "model": m.meta["file"]} for m in members],
        "modalities": ref.channels,
        "preprocess": pre,
        "tta": None,
        "threshold": float(np.mean([m.threshold for m in members])),
        "threshold_rule": "mean of the members' thresholds (each fitted on its fold's selection part)",
        "operating_points": [m.point for m in members],
        "predictions": records,
        "failed": failed,
    }
    write_json(out / "predictions.json", meta)
    if failed:
        raise ExportedModelError(
            f"{len(failed)} of {len(cases)} case(s) could not be predicted ({'; '.join(failed.values())}); "
            f"the other {len(records)} are in {out / 'predictions.csv'}"
        )
    return records
