"""`gliograde predict`: the folds' selected checkpoints as an ensemble on new cases.

Each case is preprocessed exactly as the training cache was (the parameters travel in every checkpoint); the
ensemble's P(HGG) is the mean of the folds' probabilities, each optionally averaged over the 8 axis-flip versions
of the volume (test-time augmentation). With saliency, a Grad-CAM volume per case is taken back to the case's own
voxel grid and saved as NIfTI, plus a PNG of three labelled slices through the map's centre of mass in the brain.
"""

from __future__ import annotations

import itertools
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gliograde import GRADES, MODALITIES, __version__, runtime
from gliograde.checkpoints import checkpoint_logit_scale, load_checkpoint, select_checkpoint
from gliograde.config import load_run_config
from gliograde.data.brats import UNKNOWN_GRADE, Case
from gliograde.data.preprocess import DEFAULT_MARGIN, PREPROCESS_VERSION, preprocess_case, to_original_grid
from gliograde.errors import GliogradeError
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.scoring import model_from_checkpoint
from gliograde.files import new_stamped_dir, write_json
from gliograde.inference.qc import TrainingReference, member_features
from gliograde.inference.records import decision_text, write_predictions_csv
from gliograde.inference.saliency import saliency_png
from gliograde.networks import get_architecture, gradcam, model_kind
from gliograde.runs import classes_of, config_differences, find_runs, run_environment
from gliograde.templates import relabel

log = logging.getLogger("gliograde")
ROLLOUT_TEXT = "attention rollout of the ViT (Abnar and Zuidema, 2020; the same for either class)"
FLIPS = [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)]  # 8 flip sets, () first


class PredictError(GliogradeError):
    pass


@dataclass
class Member:
    """One fold's model of the ensemble and what its input must look like."""

    fold: int | None
    checkpoint: Path
    model: torch.nn.Module  # built from the checkpoint's description (networks.ARCHITECTURES)
    modalities: list[str]
    size: int
    preprocess: dict
    point: OperatingPoint = field(default_factory=lambda: OperatingPoint(0.5, 0.5))
    logit_scale: float = 1.0
    classes: tuple[str, str] = GRADES  # the names of labels 0 and 1 its run was trained on (a cohort's own target)


def load_member(run_dir: Path, policy: str) -> Member:
    try:
        cfg = load_run_config(run_dir)
        fold, ema = cfg.fold, cfg.ema_decay > 0
    except GliogradeError:
        cfg, fold, ema = None, None, True  # a bare checkpoints/ folder: auto still prefers best_ema, never last
    path = select_checkpoint(run_dir / "checkpoints", policy, ema_enabled=ema)
    ckpt = load_checkpoint(path)
    pre = ckpt.get("preprocess")
    if pre is None:
        log.warning("%s records no preprocessing; assuming size %s and margin %d", path, ckpt["size"], DEFAULT_MARGIN)
        pre = {"size": ckpt["size"], "margin": DEFAULT_MARGIN, "preprocess_version": PREPROCESS_VERSION}
    # the operating point the run fitted on its selection part (prior correction, temperature, threshold)
    point, final = OperatingPoint(0.5, 0.5), {}
    try:
        final = json.loads((run_dir / "metrics" / "metrics.json").read_text()).get("final") or {}
        if final.get("operating_point") and final.get("checkpoint", path.name) == path.name:
            point = OperatingPoint.from_dict(final["operating_point"])
        elif final.get("operating_point"):  # fitted for the run's own checkpoint, not for this one
            log.warning(
                "%s: the run's operating point was fitted for %s, not %s; raw probabilities, threshold 0.5 (use the "
                "default --checkpoint auto for the calibrated, thresholded prediction)",
                run_dir,
                final["checkpoint"],
                path.name,
            )
    except (OSError, ValueError):
        log.warning("%s: no readable metrics/metrics.json; raw probabilities, threshold 0.5", run_dir)
    model = model_from_checkpoint(ckpt, path)
    scale = checkpoint_logit_scale(ckpt)
    classes = classes_of(final)
    return Member(fold, path, model, list(ckpt["modalities"]), int(ckpt["size"]), pre, point, scale, classes)


def true_class(case: Case, classes: tuple[str, str]) -> str | None:
    """The case's known class under the ensemble's target (None: unknown, or a class of another question, such as
    the grade folder of a case predicted by an IDH ensemble)."""
    return case.grade if case.grade != UNKNOWN_GRADE and case.grade in classes else None


def load_ensemble(paths: list[str | Path], policy: str = "auto", allow_mixed: bool = False) -> list[Member]:
    """Members from results folders (the newest complete run of each fold) and/or single run folders. Folds
    trained with different configurations are refused unless `allow_mixed`."""
    members: list[Member] = []
    for p in map(Path, paths):
        if (p / "runs").is_dir():
            runs, problems = find_runs(p)
            for (repeat, fold), why in sorted(problems.items()):
                if repeat == 0:
                    log.warning("%s: fold %d has no complete run (%s); the ensemble goes without it", p, fold, why)
            # one model per fold: repeat 0's (other repeats re-split the same patients)
            chosen = [r for (repeat, _), r in sorted(runs.items()) if repeat == 0]
            differ = config_differences(chosen)
            if differ and not allow_mixed:
                detail = "; ".join(f"{k}: {values}" for k, values in differ.items())
                raise PredictError(
                    f"--runs {p}: the folds were trained with different configurations ({detail}); an ensemble of "
                    "them mixes models. Pass --allow-mixed to use them anyway"
                )
            members += [load_member(r.run_dir, policy) for r in chosen]
        elif (p / "checkpoints").is_dir():
            members.append(load_member(p, policy))
        else:
            raise PredictError(f"--runs {p}: not a results folder (with runs/) nor a run folder (with checkpoints/)")
    if not members:
        raise PredictError(f"no checkpoints found in {', '.join(map(str, paths))}")
    ref = members[0]
    for m in members[1:]:
        for what, a, b in (
            ("model kind", model_kind(ref.model), model_kind(m.model)),
            ("modalities", ref.modalities, m.modalities),
            ("input size", ref.size, m.size),
            ("preprocessing", ref.preprocess, m.preprocess),
            ("classes", ref.classes, m.classes),
        ):
            if a != b:
                raise PredictError(
                    f"the checkpoints disagree on {what}: {ref.checkpoint} has {a}, {m.checkpoint} has {b}; "
                    "an ensemble needs models trained on the same input"
                )
    version = ref.preprocess.get("preprocess_version")
    if version != PREPROCESS_VERSION:
        raise PredictError(
            f"{ref.checkpoint} was trained on volumes of preprocessing version {version}, but this gliograde "
            f"preprocesses with version {PREPROCESS_VERSION}; new cases would not be prepared as in training"
        )
    return members


@torch.no_grad()
def _probability(member: Member, x: torch.Tensor, tta: bool, dtype) -> tuple[float, float]:
    """(raw P(HGG), P(HGG) at the member's operating point) of one case."""
    batch = torch.cat([x.flip(d) if d else x for d in FLIPS]) if tta else x
    with torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext():
        logits = member.model(batch)
    raw = float(torch.softmax(member.logit_scale * logits.float(), 1)[:, 1].mean())
    return raw, float(member.point.apply(np.array([raw]))[0])


@torch.no_grad()
def mil_attention(members: list[Member], x: torch.Tensor) -> dict:
    """The axial slices a MIL ensemble looked at (the entropy selection does not depend on the weights, so every
    fold picks the same ones) and their attention weights, averaged over the folds."""
    weights = []
    for m in members:
        m.model.eval()(x)
        slices = m.model.last_slices[0].cpu().numpy()
        weights.append(m.model.last_attention[0].float().cpu().numpy())
    mean = np.mean(weights, axis=0)
    order = np.argsort(-mean)
    return {"slices": [int(slices[i]) for i in order], "attention": [float(mean[i]) for i in order]}


def attention_strip(volume: np.ndarray, mil: dict, path: Path, title: str, n: int = 6) -> None:
    """A PNG strip of the n most-attended axial slices (last channel: FLAIR when all four are used), weights above."""
    from matplotlib.figure import Figure

    from gliograde.evaluation.plots import save_figure

    n = min(n, len(mil["slices"]))
    fig = Figure(figsize=(2.2 * n, 2.6))
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(np.rot90(volume[-1][:, :, mil["slices"][i]]), cmap="gray")
        ax.set_title(f"z={mil['slices'][i]}  w={mil['attention'][i]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def operating_point_text(members: list[Member], threshold: float) -> str:
    """What P(HGG) and the threshold in predictions.json mean, in words."""
    points = [m.point for m in members]
    rules = sorted({p.threshold_rule for p in points})
    corrected = any(p.sampled_prior != p.train_prior for p in points)
    scaled = any(p.temperature != 1.0 for p in points)
    steps = ["each fold's softmax P(HGG)"]
    if corrected:
        steps.append("corrected from the class-balanced sampler's 50/50 prior back to its training patients' prior")
    if scaled:
        steps.append("temperature-scaled")
    return (
        f"p_hgg is {', '.join(steps)}, averaged over the {len(members)} model(s) (p_hgg_raw: the mean without these "
        f"corrections). A case is called HGG when p_hgg >= threshold = {threshold:.4f}, the mean of the folds' "
        f"thresholds, each chosen on its fold's selection part ({'; '.join(rules)}), never on the reported patients. "
        "The threshold is not 0.5: a P(HGG) of 0.8 below it is called LGG. P(HGG) is a score calibrated on the "
        "training cohort, not a clinical probability."
    )


def output_dir(out: str | Path | None, parent: str | Path = "predictions") -> Path:
    """The folder for the outputs: `out` if it is new or empty, else an error (nothing is overwritten);
    by default a new parent/predict_YYYYMMDD_HHMMSS[_n]."""
    if out is None:
        return new_stamped_dir(parent, "predict")
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise PredictError(f"--out {path} already holds files; choose a new folder (nothing is overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def explain(record: dict, members, x: torch.Tensor, volume: np.ndarray, geometry, case: Case, out: Path,
            saliency: bool, saliency_layer: str) -> None:
    """Where the ensemble looked, into `record`: a MIL model's slice attention (and its strip with --saliency), or
    with --saliency the 3D models' mean saliency map (Grad-CAM; a ViT's attention rollout) on the case's own voxel
    grid (NIfTI + PNG), or why a network makes none. `volume`: the case's preprocessed input channels."""
    title = decision_text(record, brief=True)  # the decision and its threshold, not P(HGG) alone
    if get_architecture(model_kind(members[0].model)).slice_attention:
        record["mil"] = mil_attention(members, x)
        if saliency:
            png = out / "saliency" / f"{case.id}_slices.png"
            attention_strip(volume, record["mil"], png, title)
            record["saliency"] = {"png": str(png), "method": "the most-attended axial slices and their weights"}
    elif saliency:
        cams = [gradcam.saliency(m.model, x, layer=saliency_layer) for m in members]
        if cams[0][0] is None:  # a network with neither a feature map nor attention rollout: said, no file
            record["saliency"] = {"method": None, "note": cams[0][1]}
            return
        cam = torch.stack([c[0][0] for c in cams]).mean(0)
        cam = (cam / cam.max().clamp_min(1e-12)).cpu().numpy()  # the ensemble map scaled to peak 1 again
        image = to_original_grid(cam, geometry)
        # the upsampled map blurs past the skull: cut it to the case's own brain mask on its own grid
        brain = np.any([np.asarray(nib.load(str(f)).dataobj) != 0 for f in case.files], axis=0)
        image = nib.Nifti1Image(image.get_fdata(dtype=np.float32) * brain, image.affine)
        how = ROLLOUT_TEXT if cams[0][1] == gradcam.ROLLOUT else "Grad-CAM of the HGG logit"
        nii = out / "saliency" / f"{case.id}_gradcam.nii.gz"
        nib.save(image, str(nii))
        png = out / "saliency" / f"{case.id}_gradcam.png"
        where = saliency_png(image, case.paths["flair"], png, title)
        record["saliency"] = {
            "nifti": str(nii),
            "png": str(png),
            **where,  # the voxel the PNG's slices go through (the map's centre of mass in the brain) and the peak
            "layer": cams[0][1],
            "method": f"{how}; each fold's map scaled to peak 1, averaged, scaled to peak 1",
        }


def prediction_meta(members, names, threshold: float, tta: bool, qc, records: list[dict], failed: dict) -> dict:
    """predictions.json: the ensemble, its input, its operating point explained, the QC methods, the records."""
    return {
        "gliograde": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "ensemble": [{"name": n, "checkpoint": str(m.checkpoint)} for n, m in zip(names, members, strict=True)],
        "modalities": members[0].modalities,
        "classes": list(members[0].classes),  # labels 0 and 1: p_hgg is P(classes[1]) for any target
        "preprocess": members[0].preprocess,
        "tta": f"mean over {len(FLIPS)} axis flips" if tta else None,
        "threshold": threshold,
        "threshold_rule": "mean of the members' thresholds (each fitted on its fold's selection part)",
        "operating_point_explained": relabel(operating_point_text(members, threshold), members[0].classes),
        "operating_points": [m.point.to_dict() for m in members],
        "qc": qc.describe(),
        "predictions": records,
        "failed": failed,
    }


def predict_cases(
    cases: list[Case],
    members: list[Member],
    out: Path,
    tta: bool = False,
    saliency: bool = False,
    device: torch.device | None = None,
    saliency_layer: str = "auto",
    qc: TrainingReference | None = None,
) -> list[dict]:
    """Predict every case; write predictions.csv/.json (and saliency/) into `out`; return the records. Each record
    holds its input-quality flags (`qc`, see inference/qc.py; `qc`: a reference already built, else built here)."""
    repeated = sorted({c.id for c in cases if [d.id for d in cases].count(c.id) > 1})
    if repeated:
        raise PredictError(f"case id(s) {repeated} given twice; their outputs would overwrite each other")
    device = device or runtime.pick_device("auto")
    ref = members[0]
    recorded = run_environment(ref.checkpoint.parent.parent)  # the run's own decision, where the device kind matches
    precision = runtime.reuse_precision(recorded.get("precision"), recorded.get("device"), device)
    log.info("Precision: %s", precision.reason)
    # each member's P(HGG) at its own operating point (fitted on its fold's selection part), averaged; the decision
    # threshold is the mean of the members' thresholds
    threshold = float(np.mean([m.point.threshold for m in members]))
    channels = [MODALITIES.index(m) for m in ref.modalities]
    for m in members:
        m.model.to(device)
    if qc is None:
        qc = TrainingReference.of(members)
        qc.ensure_hashes()
        qc.ensure_features(members, device)
    if saliency:
        (out / "saliency").mkdir(exist_ok=True)
        slices = get_architecture(model_kind(ref.model)).slice_attention
        if not slices and gradcam.saliency_grid(ref.model, ref.size) is None:
            log.warning("--saliency: no saliency map is made for %s (neither a feature map for Grad-CAM nor attention "
                        "rollout); each case's record says so", ref.model.describe())  # fmt: skip
    names = [f"fold_{m.fold}" if m.fold is not None else m.checkpoint.parent.parent.name for m in members]
    records, failed = [], {}
    for case in cases:
        try:
            volume, geometry = preprocess_case(case, ref.size, ref.preprocess.get("margin", DEFAULT_MARGIN))
        except GliogradeError as e:
            log.error("case %s: %s", case.id, e)
            failed[case.id] = str(e)
            continue
        x = torch.from_numpy(volume[channels].astype(np.float32))[None].to(device)
        dtype = precision.dtype
        both = [_probability(m, x, tta, dtype) for m in members]
        per_model = [b[1] for b in both]
        p = float(np.mean(per_model))
        neg, pos = ref.classes  # p_hgg, predicted_grade, true_grade: the seeds' keys, for any target's classes
        record = {
            "case": case.id,
            "p_hgg": p,
            "p_hgg_raw": float(np.mean([b[0] for b in both])),
            "threshold": threshold,
            "predicted_grade": ref.classes[int(p >= threshold)],
            "decision_rule": f"{pos} when p_hgg{'' if pos == 'HGG' else f' = P({pos})'} >= threshold, else {neg}",
            "true_grade": true_class(case, ref.classes),
            "classes": list(ref.classes),
            "folds": dict(zip(names, per_model, strict=True)),
            "qc": qc.check(case, volume, member_features(members, x) if qc.members else None, ref.preprocess),
        }
        explain(record, members, x, volume[channels], geometry, case, out, saliency, saliency_layer)
        records.append(record)
        log.info("%s", decision_text(record))

    if not records:  # nothing to show: no empty table presented as an output, and the same --out can be used again
        raise PredictError(f"none of the {len(cases)} case(s) could be predicted (the reason for each is above); "
                           f"nothing was written to {out}")  # fmt: skip
    write_predictions_csv(out, records, names)
    write_json(out / "predictions.json", prediction_meta(members, names, threshold, tta, qc, records, failed))
    if failed:  # each reason was said once above; here only which cases, and where the others are
        raise PredictError(
            f"{len(failed)} of {len(cases)} case(s) could not be predicted ({', '.join(failed)}; reasons above and in "
            f"predictions.json); the other {len(records)} are in {out / 'predictions.csv'}"
        )
    return records
