"""`gliograde validate`: the cross-validation ensemble scored on a labelled cohort it never saw (external validation).

    cohort (HGG/ LGG/ folders, or name_mapping.csv)  --leakage check-->  predict (the ensemble, as `predict` does)
        -->  metrics at the ensemble's own operating point, calibration, sites, input quality, the CV beside it
        -->  a NEW folder: validation.json, validation.md, report.html, predictions.csv, figures

Refused, with one line and nothing written: a cohort without grades, an --out that already holds files, runs of
different configurations (as `predict` refuses them), and a cohort sharing a patient with the training folds: the
same case id (BraTS year prefix aside), or the same image under another id (the sha256 of the case preprocessed as
the runs' cache was, rounded to float16, against the cache's volumes). `allow_overlap` scores such a cohort anyway,
and every output is then labelled OVERLAPS THE TRAINING DATA with the shared cases listed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from warnings import catch_warnings, filterwarnings

import numpy as np

from gliograde import GRADES, __version__, runtime
from gliograde.data.brats import MAPPING_FILE, UNKNOWN_SITE, Case, Discovery, discover_cases
from gliograde.data.cohort import CohortSource
from gliograde.data.preprocess import DEFAULT_MARGIN, PREPROCESS_VERSION, preprocess_case
from gliograde.errors import GliogradeError
from gliograde.evaluation import stats
from gliograde.evaluation.metrics import added, compute_metrics
from gliograde.evaluation.plots import pr, roc, save_figure
from gliograde.evaluation.site_baseline import site_warning
from gliograde.files import new_stamped_dir, write_json, write_text_atomic
from gliograde.inference.predict import load_ensemble, operating_point_text, predict_cases
from gliograde.inference.qc import TrainingReference, flag_summary, volume_hash
from gliograde.inference.qc import plain_id as _plain_id  # one rule for predict's flag and the leakage check
from gliograde.runs import runs_model
from gliograde.templates import class_words, relabel

log = logging.getLogger("gliograde")
OVERLAP_LABEL = "OVERLAPS THE TRAINING DATA"
FIGURES = ("validation_roc.png", "validation_pr.png", "validation_reliability.png")
METHODS = {
    "p_hgg": "each fold member's P(HGG) at its own operating point (prior correction, temperature), averaged over "
    "the members, as `predict` computes it",
    "operating_point": "a case is called HGG when P(HGG) >= the ensemble threshold, the mean of the members' "
    "thresholds (each fitted on its fold's selection part): the threshold `predict` uses, not re-fitted here",
    "auc_ci": stats.AUC_CI_METHOD,
    "rates_ci": "Wilson score interval for sensitivity, specificity, accuracy, PPV and NPV; balanced accuracy: a "
    "Wilson interval on its effective n; a rate whose grade is absent is null (n/a), never 0",
    "brier": "mean squared difference between P(HGG) and the 0/1 grade",
    "ece": "expected calibration error over 10 equal-width bins of [0, 1], each |mean P(HGG) - fraction HGG| weighted "
    "by its share of the patients",
    "leakage": "a validation case shares a patient with the training folds when its id equals a training id (the "
    "runs' config.json split records and their cache's cases.csv; the BraTS year prefix, e.g. Brats18_/BraTS19_, is "
    "ignored) or when its image is the same: sha256 of the volume preprocessed exactly as the runs' cache was made "
    "(size, margin, preprocessing version), rounded to float16, against the hashes of the cache's volumes.npy",
    "site_baseline": "logistic regression on one-hot sites fitted on the training cache's patients (site and grade), "
    "predicting each validation patient from its site alone; a site unseen in training gets the intercept, an "
    "unknown site the training prior",
    "cv": "the cross-validation's own figures, from RESULTS/summary.json when present, else computed as `summarize` "
    "does (mean ± sample SD of the per-fold AUCs, pooled out-of-fold AUC with its Newcombe interval), at each fold's "
    "own threshold",
}


class ValidateError(GliogradeError):
    pass


# -------------------------------------------------------------------------------------------------- inputs
def labelled_cohort(root: str | Path | CohortSource) -> Discovery:
    """The cohort's cases with their labels: from a cohort table (a CohortSource with a table), else with their
    grades from the BraTS 2018/2019 folders or a BraTS 2020 name_mapping.csv."""
    if isinstance(root, CohortSource):
        if root.table is not None:
            return root.discover()
        root = root.data_root
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValidateError(f"--data-root {root} does not exist or is not a folder")
    if not (any((root / g).is_dir() for g in GRADES) or (root / MAPPING_FILE).is_file()):
        raise ValidateError(
            f"--data-root {root} gives no grades: validate needs a labelled cohort, as HGG/ and LGG/ folders of case "
            f"folders (BraTS 2018/2019 layout) or case folders beside a {MAPPING_FILE} with a Grade column (BraTS "
            "2020 layout); to predict cases without grades use `gliograde predict`"
        )
    return discover_cases(root)


def check_out(out: str | Path | None) -> Path | None:
    """The --out folder, refused when it already holds files (nothing is created here)."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValidateError(f"--out {path} already holds files; choose a new folder (nothing is overwritten)")
    return path


def find_overlap(cases: list[Case], reference: TrainingReference) -> list[dict]:
    """The validation cases that share a patient with the training folds, and how (case id, image)."""
    plain = {}
    for i in sorted(reference.ids):
        plain.setdefault(_plain_id(i), i)
    params = reference.cache_params()
    hashing = reference.hashes is not None and params is not None
    if hashing and params.get("preprocess_version") != PREPROCESS_VERSION:
        reference.missing["image_hash"] = (
            f"the cache was made with preprocessing version {params.get('preprocess_version')}, this gliograde "
            f"preprocesses with version {PREPROCESS_VERSION}"
        )
        hashing = False
    # a cohort's patients with several exams: any exam of a training patient is that patient again
    patients = {}
    if reference.cache is not None:
        for record in reference.cache.cases:
            patients.setdefault(record.patient, record.id)
    shared = []
    for case in cases:
        matches = []
        if case.id in reference.ids or _plain_id(case.id) in plain:
            matches.append({"by": "case id", "training_case": case.id if case.id in reference.ids else
                            plain[_plain_id(case.id)]})  # fmt: skip
        elif case.patient != case.id and case.patient in patients:
            matches.append({"by": f"patient id {case.patient}", "training_case": patients[case.patient]})
        if hashing:
            volume, _ = preprocess_case(case, int(params["size"]), int(params.get("margin", DEFAULT_MARGIN)))
            hit = reference.hashes.get(volume_hash(volume))
            if hit is not None:
                matches.append({"by": "image (same preprocessed volume)", "training_case": hit})
        if matches:
            shared.append({"case": case.id, "patient": case.patient, "matches": matches})
    return shared


def overlap_text(shared: list[dict], first: int = 3) -> str:
    """The first few shared cases, and how many more: one readable line whatever the size of the overlap."""
    text = "; ".join(
        f"{s['case']} = training case " + " and ".join(f"{m['training_case']} (by {m['by']})" for m in s["matches"])
        for s in shared[:first]
    )
    return text + (f"; and {len(shared) - first} more" if len(shared) > first else "")


def write_overlap(shared: list[dict], out: Path | None) -> Path:
    """Every shared case in a CSV (case, training_case, by) beside where the outputs would go: <out>.overlap.csv, or
    validation/overlap_<time>.csv. The one file a refused validation writes: the list the message can only begin."""
    parent = out.parent if out is not None else Path("validation")
    name = f"{out.name}.overlap.csv" if out is not None else f"overlap_{datetime.now():%Y%m%d_%H%M%S}.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "training_case", "by"])
    w.writerows([s["case"], m["training_case"], m["by"]] for s in shared for m in s["matches"])
    parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(parent / name, buf.getvalue())
    return parent / name


# ------------------------------------------------------------------------------------------------ statistics
def site_table(sites: list[str], y: np.ndarray, p: np.ndarray, threshold: float, classes=GRADES) -> dict:
    """Per site (as data/brats.py parsed it): cases, grades, single grade, accuracy, sensitivity, specificity and
    AUC; ids naming no site are listed last and never counted as one site."""
    table = {}
    for site in sorted(set(sites), key=lambda s: (s == UNKNOWN_SITE, s)):
        rows = [k for k, s in enumerate(sites) if s == site]
        m = compute_metrics(y[rows], p[rows], threshold, classes)
        counts = Counter(int(y[k]) for k in rows)
        neg, pos = classes
        entry = {"cases": len(rows), pos: counts.get(1, 0), neg: counts.get(0, 0)}
        entry["single_grade"] = None if site == UNKNOWN_SITE else entry[pos] == 0 or entry[neg] == 0
        entry.update({k: m[k] for k in ("accuracy", "sensitivity", "specificity", "auc")})
        table[site] = entry
    known = sum(e["cases"] for s, e in table.items() if s != UNKNOWN_SITE)
    return {
        "sites": table,
        "known_sites": sum(s != UNKNOWN_SITE for s in table),
        "patients_in_single_grade_sites": sum(e["cases"] for e in table.values() if e["single_grade"]),
        "patients_with_known_site": known,
        "patients_with_unknown_site": len(sites) - known,
        "patients": len(sites),
    }


def site_baseline_external(reference: TrainingReference, sites: list[str], y: np.ndarray) -> dict:
    """How well the site alone, learnt on the training patients, predicts the validation grades."""
    from gliograde.evaluation.site_baseline import site_model

    if reference.cache is None:
        return {"error": "the runs' cache (the training patients' sites and grades) was not found"}
    train_sites = [c.site for c in reference.cache.cases]
    probs = site_model(train_sites, reference.cache.labels)(sites)
    known = set(train_sites)
    return {
        "auc": stats.auc_ci_or_reason(y, probs).get("auc", math.nan),
        "auc_ci": stats.auc_ci_or_reason(y, probs),
        "sites_unseen_in_training": sorted({s for s in sites if s not in known and s != UNKNOWN_SITE}),
        "probs": [float(v) for v in probs],
    }


def cv_reference(results: Path) -> dict:
    """The CV's own figures: from summary.json when present, else computed from the runs as summarize does."""
    from gliograde.runs import find_runs, fold_row, threshold_of

    path = results / "summary.json"
    if path.is_file():
        try:
            s = json.loads(path.read_text())
            h, p = s.get("headline") or {}, s.get("pooled") or {}
            cal = p.get("calibration") or {}
            return {
                "source": f"{path} (written by summarize)",
                "k": s.get("k"),
                "protocol": s.get("protocol_label") or s.get("protocol"),
                "auc_mean_of_folds": h.get("auc_mean_of_folds"),
                "auc_std_of_folds": h.get("auc_std_of_folds"),
                "auc_folds": h.get("auc_folds"),
                "auc_pooled": h.get("auc_pooled", p.get("auc")),
                "auc_pooled_ci95": h.get("auc_pooled_ci95"),
                "n": p.get("n"),
                **{k: p.get(k) for k in ("sensitivity", "specificity", "balanced_accuracy")},
                "brier": cal.get("brier"),
                "ece": cal.get("ece"),
                "threshold": "each fold's own threshold",
                "figures": [  # beside summary.json: its paths may be relative to where summarize ran
                    str(results / Path(f).name)
                    for f in s.get("figures") or []
                    if Path(f).name in ("cv_roc_curves.png", "cv_reliability.png")
                ],
            }
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s unreadable (%s); the CV figures are computed from the runs", path, e)
    if not (results / "runs").is_dir():
        return {"error": f"{results} is not a results folder (no runs/): no cross-validation to compare with"}
    try:
        runs, _ = find_runs(results)
    except GliogradeError as e:
        return {"error": str(e)}
    chosen = [r for (repeat, _), r in sorted(runs.items()) if repeat == 0]
    if not chosen:
        return {"error": f"no complete run under {results}"}
    rows = [fold_row(r) for r in chosen]
    mean, sd = stats.mean_std([row["auc"] for row in rows])
    labels = np.concatenate([r.labels for r in chosen])
    probs = np.concatenate([r.probs for r in chosen])
    pooled = compute_metrics(labels, probs, threshold_of(chosen))
    ci = stats.auc_ci_or_reason(labels, probs)
    return {
        "source": f"computed from the runs under {results} as summarize does (no summary.json)",
        "k": chosen[0].folds,
        "protocol": chosen[0].protocol,
        "auc_mean_of_folds": mean,
        "auc_std_of_folds": sd,
        "auc_folds": int(np.sum(~np.isnan([row["auc"] for row in rows]))),
        "auc_pooled": pooled["auc"],
        "auc_pooled_ci95": [ci["ci_low"], ci["ci_high"]] if "ci_low" in ci else None,
        "n": len(labels),
        **{k: pooled[k] for k in ("sensitivity", "specificity", "balanced_accuracy")},
        "brier": stats.brier(labels, probs),
        "ece": stats.ece(labels, probs, 10),
        "threshold": "each fold's own threshold",
        "figures": [str(results / n) for n in ("cv_roc_curves.png", "cv_reliability.png") if (results / n).is_file()],
    }


def _metrics(y: np.ndarray, p: np.ndarray, threshold: float, classes=GRADES) -> dict:
    m = compute_metrics(y, p, threshold, classes)
    rates = stats.rates_with_ci(y, p, threshold)
    rates["method"] = "Wilson score interval; balanced accuracy: Wilson on its effective n"
    return {
        "n": len(y),
        "n_hgg": int(np.sum(y == 1)),
        "n_lgg": int(np.sum(y == 0)),
        "threshold": threshold,
        "auc": m["auc"],
        "auc_ci": stats.auc_ci_or_reason(y, p),
        "accuracy": m["accuracy"],
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "balanced_accuracy": m["balanced_accuracy"],
        **added(m),  # the registered metrics of the table (evaluation/metrics.py)
        "ppv": rates["ppv"]["value"],
        "npv": rates["npv"]["value"],
        "rates": rates,
        "confusion_matrix": m["confusion_matrix"],
        "calibration": {
            "brier": stats.brier(y, p),
            "ece": stats.ece(y, p, 10),
            "n_bins": 10,
            "binning": "10 equal-width bins of [0, 1], weighted by their counts",
            "reliability": {k: np.asarray(v).tolist() for k, v in stats.reliability(y, p, 10).items()},
        },
    }


# ------------------------------------------------------------------------------------------------------ outputs
def _predictions_csv(path: Path, records: list[dict], names: list[str], label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "p_hgg", "threshold", "predicted_grade", "true_grade", "site", "qc_flags",
                "shared_with_training", "cohort_label", *names])  # fmt: skip
    for r in records:
        shared = " ".join(f"{m['training_case']} ({m['by']})" for m in r.get("shared_with_training") or [])
        w.writerow([r["case"], repr(float(r["p_hgg"])), repr(float(r["threshold"])), r["predicted_grade"],
                    r["true_grade"], r["site"], " ".join(r["qc"]["flags"]), shared, label,
                    *(repr(float(v)) for v in r["folds"].values())])  # fmt: skip
    write_text_atomic(path, buf.getvalue())


def _figures(out: Path, y: np.ndarray, p: np.ndarray, auc: float, label: str, positive: str = "HGG") -> list[str]:
    tail = f" ({label})" if label else ""
    with catch_warnings():  # a cohort of one grade has no curve to label
        filterwarnings("ignore", "No artists with labels found", UserWarning)
        roc(y, p, out / "validation_roc.png", "ROC, validation cohort" + tail, auc, positive)
        pr(y, p, out / "validation_pr.png", "precision-recall, validation cohort" + tail, positive)
    curve = {"validation": stats.reliability(y, p, 10)}
    save_figure(
        stats.reliability_figure(curve, "Reliability, validation cohort" + tail), out / "validation_reliability.png"
    )
    return [str(out / name) for name in FIGURES]


def _place(stage: Path, out: Path | None) -> Path:
    """Rename the finished staging folder into place: --out (new or empty), or validation/validate_<time>."""
    target = out if out is not None else new_stamped_dir("validation", "validate")
    if target.exists():
        if any(target.iterdir()):  # filled while we worked
            raise ValidateError(f"--out {target} already holds files; the results are left in {stage}")
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, target)
    return target


def validate(
    runs: str | Path,
    data_root: str | Path | CohortSource,
    out: str | Path | None = None,
    tta: bool = False,
    allow_overlap: bool = False,
    policy: str = "auto",
    device: str = "auto",
) -> dict:
    """Score the ensemble of `runs` on the labelled cohort under `data_root`; write the outputs into a new folder
    and return the validation record (validation.json). Every refusal raises before anything is written (but the
    list of the cases it shares with the training folds, which the refusal names: `write_overlap`)."""
    out_path = check_out(out)
    discovery = labelled_cohort(data_root)
    cases = discovery.cases
    members = load_ensemble([runs], policy)
    if tuple(discovery.target.classes) != tuple(members[0].classes):
        runs_q, cohort_q = " vs ".join(members[0].classes[::-1]), " vs ".join(discovery.target.classes[::-1])
        raise ValidateError(f"the runs answer {runs_q}, the cohort's labels {cohort_q} ({discovery.target.column!r}): "
                            "validate on a cohort labelled for the runs' question (--target/--positive)")  # fmt: skip
    dev = runtime.pick_device(device)
    for m in members:
        m.model.to(dev)
    reference = TrainingReference.of(members)
    reference.ensure_hashes()
    shared = find_overlap(cases, reference)
    if shared and not allow_overlap:
        listing = write_overlap(shared, out_path)
        raise ValidateError(
            f"the cohort shares {len({s['patient'] for s in shared})} patient(s) with the training folds "
            f"({overlap_text(shared)}; all of them "
            f"in {listing}); remove them, or pass --allow-overlap for results labelled OVERLAPS THE TRAINING DATA"
        )
    reference.ensure_features(members, dev)
    with tempfile.TemporaryDirectory(prefix="gliograde-validate-") as tmp:
        records = predict_cases(cases, members, Path(tmp), tta, device=dev, qc=reference)
        predicted = json.loads((Path(tmp) / "predictions.json").read_text())
    by_id = {c.id: c for c in cases}
    shared_of = {s["case"]: s["matches"] for s in shared}
    for r in records:
        r["site"] = by_id[r["case"]].site
        r["shared_with_training"] = shared_of.get(r["case"], [])
    report = validation_record(runs, discovery, members, reference, records, predicted, shared, allow_overlap)
    return write_outputs(report, records, out_path)


def validation_record(runs, discovery: Discovery, members, reference: TrainingReference, records: list[dict],
                      predicted: dict, shared: list[dict], allow_overlap: bool) -> dict:  # fmt: skip
    """The validation record (validation.json, less its output paths) from the ensemble's predictions."""
    label = OVERLAP_LABEL if shared else ""
    classes = tuple(members[0].classes)
    y = np.array([classes.index(r["true_grade"]) for r in records], dtype=np.int64)
    p = np.array([r["p_hgg"] for r in records], dtype=np.float64)
    threshold = float(predicted["threshold"])
    metrics = _metrics(y, p, threshold, classes)
    sites = [r["site"] for r in records]
    audit = site_table(sites, y, p, threshold, classes)
    qc_summary = relabel(flag_summary(records), classes)
    return {
        "title": "External validation" + (f" ({OVERLAP_LABEL})" if label else ""),
        "label": label or None,
        "gliograde": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "runs": str(runs),
        "model": runs_model([m.checkpoint.parent.parent for m in members]),  # run_dir/checkpoints/x.pt
        "classes": list(classes),
        "data_root": str(discovery.table or discovery.root),
        "layout": discovery.layout,
        "tta": predicted.get("tta"),
        "cohort": {
            "n": len(records),
            "n_hgg": metrics["n_hgg"],
            "n_lgg": metrics["n_lgg"],
            "sites": audit["known_sites"],
            "patients_with_unknown_site": audit["patients_with_unknown_site"],
            "excluded_ungraded": discovery.ungraded,
            "skipped": discovery.skipped,
            "qc": qc_summary,
            "qc_flagged_cases": sum(bool(r["qc"]["flags"]) for r in records),
        },
        "leakage": {
            "checked_by": ["case id (BraTS year prefix ignored)"]
            + (["image hash of the preprocessed volume"] if "image_hash" not in reference.missing else []),
            "training_cases": len(reference.ids),
            "shared": shared,
            "allowed": bool(allow_overlap),
            "not_checked": {k: v for k, v in reference.missing.items() if k == "image_hash"},
        },
        "ensemble": {
            "members": predicted["ensemble"],
            "threshold": threshold,
            "threshold_rule": predicted["threshold_rule"],
            "operating_point_explained": relabel(operating_point_text(members, threshold), classes),
            "operating_points": predicted["operating_points"],
            "modalities": predicted["modalities"],
            "preprocess": predicted["preprocess"],
        },
        "metrics": metrics,
        "sites": audit,
        "site_baseline": site_baseline_external(reference, sites, y),
        "cv": cv_reference(Path(runs)),
        "qc_methods": relabel(predicted.get("qc") or reference.describe(), classes),
        "predictions": records,
        "figures": [],
        "methods": relabel(METHODS, classes),
        "warnings": cohort_warnings(shared, reference, metrics, audit, qc_summary, len(records), classes),
    }


def cohort_warnings(shared: list[dict], reference: TrainingReference, metrics: dict, audit: dict, qc_summary: dict,
                    n: int, classes=GRADES) -> list[str]:  # fmt: skip
    """What the reader of the figures must know: an overlap, checks not made, one grade only, single-grade sites,
    cases the input checks flagged."""
    warnings = []
    if shared:
        warnings.append(f"{OVERLAP_LABEL}: {len(shared)} case(s) share a patient with the training folds "
                        f"({overlap_text(shared)}; all of them in the shared_with_training column of "
                        "predictions.csv); the figures are not an external validation")  # fmt: skip
    for check, why in reference.missing.items():
        warnings.append(f"not checked: {check} ({why})")
    what = class_words(classes)["what"]
    if metrics["n_hgg"] == 0 or metrics["n_lgg"] == 0:
        warnings.append(f"the cohort holds one {what} only: AUC, and the rate of the absent {what}, are n/a")
    w = site_warning(audit, what, pointer=False)
    if w:
        warnings.append(w)
    for name, entry in qc_summary.items():
        if entry["n"]:
            warnings.append(f"QC {name}: {entry['n']} of {n} case(s) ({', '.join(entry['cases'][:10])}"
                            f"{', ...' if entry['n'] > 10 else ''}): {entry['meaning']}")  # fmt: skip
    return warnings


def write_outputs(report: dict, records: list[dict], out_path: Path | None) -> dict:
    """The figures, validation.json, predictions.csv, validation.md and report.html, written into a staging folder
    that is renamed into place once complete (a failure leaves nothing behind); returns the record, its paths
    naming the final folder."""
    from gliograde.inference.validate_report import write_html, write_markdown

    label = report["label"] or ""
    classes = tuple(report.get("classes") or GRADES)
    y = np.array([classes.index(r["true_grade"]) for r in records], dtype=np.int64)
    p = np.array([r["p_hgg"] for r in records], dtype=np.float64)
    parent = out_path.parent if out_path is not None else Path("validation")
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".{(out_path or Path('validate')).name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        report["figures"] = figures = _figures(stage, y, p, report["metrics"]["auc"], label, classes[1])
        write_json(stage / "validation.json", report, strict=True)
        _predictions_csv(stage / "predictions.csv", records, list(records[0]["folds"]), label)
        write_markdown(stage / "validation.md", report)
        write_html(stage / "report.html", report)
        final = _place(stage, out_path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # the paths inside the record name the final folder
    report["out"] = str(final)
    report["figures"] = [str(final / Path(f).name) for f in figures]
    write_json(final / "validation.json", report, strict=True)
    return report
