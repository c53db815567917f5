"""validation.md and report.html of `gliograde validate`, from the validation record (validation.json).

Rendered from templates/validation.md.j2 and templates/validation.html.j2 with the shared macros: the functions here
turn the record into plain rows (cells formatted by the filters of gliograde.templates). The page is self-contained
like summarize's report.html (figures as base64 PNG data URIs, inline style, no script); every string from the record
is HTML-escaped (autoescape).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from gliograde import __version__
from gliograde.data.brats import UNKNOWN_SITE
from gliograde.evaluation.metrics import METRICS, added
from gliograde.evaluation.report import (
    ascii_page,
    confusion_rows,
    model_view,
    png_uri,
    rate_names,
    rate_rows,
)
from gliograde.files import write_text_atomic
from gliograde.inference.qc import FLAGS
from gliograde.runs import classes_of, model_line
from gliograde.templates import dashed, fixed, num, relabel, render, yes_no

CAPTIONS = {
    "validation_roc.png": "ROC curve of the ensemble on the validation cohort.",
    "validation_pr.png": "Precision-recall curve on the validation cohort (HGG positive), with the prevalence of HGG.",
    "validation_reliability.png": "Reliability diagram of P(HGG) on the validation cohort (10 equal-width bins).",
    "cv_roc_curves.png": "For comparison: the cross-validation's ROC curves (each fold, mean ± SD, pooled).",
    "cv_reliability.png": "For comparison: the cross-validation's reliability diagram (pooled out-of-fold).",
}


def _shared_lines(report: dict) -> list[str]:
    return [
        f"{s['case']}: " + ", ".join(f"{m['training_case']} (by {m['by']})" for m in s["matches"])
        for s in report["leakage"]["shared"]
    ]


def validation_model(report: dict) -> dict:
    """The ensemble's network, depth, input and preset (the runs' config.json); the input from the checkpoints where
    the runs record no configuration (a bare checkpoints/ folder, or a record written before the field)."""
    ensemble = report.get("ensemble") or {}
    known = {"modalities": ensemble.get("modalities"), "size": (ensemble.get("preprocess") or {}).get("size")}
    recorded = report.get("model") or {}
    return {**{k: v for k, v in known.items() if v is not None}, **{k: v for k, v in recorded.items() if v is not None}}


def comparison_rows(report: dict) -> list[tuple[str, str, str]]:
    """(measure, validation, cross-validation) rows of the headline table."""
    m, cv = report["metrics"], report.get("cv") or {}
    ci = m.get("auc_ci") or {}
    neg, pos = classes_of(report)
    return [
        ("Patients", str(m["n"]), str(cv.get("n", "n/a"))),
        ("AUC", f"{fixed(m['auc'])} (95 % CI {dashed(ci)}, Newcombe)",
         f"mean of the per-fold AUCs {fixed(cv.get('auc_mean_of_folds'))} ± {fixed(cv.get('auc_std_of_folds'))} (SD)"),
        ("Pooled AUC", "(one ensemble: the AUC above)",
         f"{fixed(cv.get('auc_pooled'))} (95 % CI {dashed(cv.get('auc_pooled_ci95'))}, Newcombe)"),
        (f"Sensitivity ({pos})", fixed(m["sensitivity"]), fixed(cv.get("sensitivity"))),
        (f"Specificity ({neg})", fixed(m["specificity"]), fixed(cv.get("specificity"))),
        ("Balanced accuracy", fixed(m["balanced_accuracy"]), fixed(cv.get("balanced_accuracy"))),
        *((METRICS[k].label, fixed(v), fixed(cv.get(k))) for k, v in added(m).items()),  # registered metrics
        ("Brier", fixed(m["calibration"]["brier"]), fixed(cv.get("brier"))),
        ("ECE (10 equal-width bins)", fixed(m["calibration"]["ece"]), fixed(cv.get("ece"))),
        ("Threshold", f"ensemble {fixed(m['threshold'])}", str(cv.get("threshold", "n/a"))),
    ]  # fmt: skip


def false_alarms(report: dict) -> str:
    """What the out-of-distribution flag costs: the share of each member's own held-out patients (drawn from the
    training cohort) that it would flag."""
    members = [m for m in report["qc_methods"].get("members") or [] if m.get("heldout_flag_rate") is not None]
    if not members:
        return ""
    rates = ", ".join(f"{m['name']} {100 * m['heldout_flag_rate']:.0f} %" for m in members)
    return (
        f"Its false-alarm rate, measured on each fold's own held-out patients of the training cohort: {rates} "
        f"(reference of {members[0]['training_patients']} training patients per member)."
    )


# ------------------------------------------------------------------------------------------------------ markdown
def _md_rates(m: dict, classes) -> list[list[str]]:
    rows = []
    for key, name in rate_names(classes):
        r = m["rates"].get(key) or {}
        count = f"{r.get('k', 0):.0f} / {r.get('n', 0):.0f}" if key != "balanced_accuracy" else "effective n"
        rows.append([name, fixed(r.get("value")), dashed(r), count])
    return rows


def _md_sites(report: dict) -> list[list]:
    neg, pos = classes_of(report)
    return [
        [f"{site} (ids naming no site; not one site)" if site == UNKNOWN_SITE else site, e["cases"], e[pos],
         e[neg], yes_no(e["single_grade"]), fixed(e["accuracy"]), fixed(e["auc"])]
        for site, e in report["sites"]["sites"].items()
    ]  # fmt: skip


def _md_cases(report: dict) -> list[list]:
    return [
        [r["case"], r["true_grade"], r["site"], fixed(r["p_hgg"]), fixed(r["threshold"]), r["predicted_grade"],
         " ".join(r["qc"]["flags"]) or "-", ", ".join(x["training_case"] for x in r.get("shared_with_training") or [])]
        for r in report["predictions"]
    ]  # fmt: skip


def markdown(report: dict) -> str:
    """validation.md (templates/validation.md.j2) of a validation record."""
    return render(
        "validation.md.j2",
        classes=classes_of(report),
        r=report,
        model=model_line(validation_model(report)),
        shared=_shared_lines(report),
        comparison=[list(row) for row in comparison_rows(report)],
        rates=_md_rates(report["metrics"], classes_of(report)),
        sites=_md_sites(report),
        qc=[[name, e["n"], e["meaning"]] for name, e in report["cohort"]["qc"].items()],
        false_alarms=false_alarms(report),
        cases=_md_cases(report),
        methods=[f"**{k}**: {v}" for k, v in report["methods"].items()],
        figures=[Path(f).name for f in report["figures"]],
    )


def write_markdown(path: Path, report: dict) -> None:
    write_text_atomic(path, markdown(report))


# ---------------------------------------------------------------------------------------------------------- html
def _figure(path: Path) -> dict:
    """A figure of the page: its data URI (None where the file is missing or not a PNG), caption and name."""
    return {"uri": png_uri(path), "caption": CAPTIONS.get(path.name, path.name), "name": path.name}


def _site_rows(report: dict) -> dict:
    neg, pos = classes_of(report)
    rows, classes = [], []
    for site, e in report["sites"]["sites"].items():
        name = site if site != UNKNOWN_SITE else "unknown (ids naming no site; not one site)"
        rows.append([name, num(e["cases"]), num(e[pos]), num(e[neg]), num(e["single_grade"]), num(e["accuracy"]),
                     num(e["sensitivity"]), num(e["specificity"]), num(e["auc"])])  # fmt: skip
        classes.append("flag" if e["single_grade"] else "")
    return {"rows": rows, "classes": classes}


def _case_rows(report: dict) -> dict:
    rows, classes = [], []
    for r in report["predictions"]:
        shared = ", ".join(x["training_case"] for x in r.get("shared_with_training") or [])
        rows.append([r["case"], r["true_grade"], r["site"], num(r["p_hgg"], 4), num(r["threshold"], 4),
                     r["predicted_grade"], " ".join(r["qc"]["flags"]) or "-", shared or "-"])  # fmt: skip
        classes.append("flag" if r["qc"]["flags"] or shared else "")
    return {"rows": rows, "classes": classes}


def _ensemble_view(ensemble: dict) -> dict:
    members = {x["name"]: x["checkpoint"] for x in ensemble["members"]}
    return {"members": members, "threshold": ensemble["threshold"], "threshold rule": ensemble["threshold_rule"]}


def render_html(report: dict, folder: Path) -> str:
    """The validation's report.html (templates/validation.html.j2); figures read from `folder` by name, the
    cross-validation's from their recorded paths."""
    cv, label = report.get("cv") or {}, report.get("label")
    qc_methods = {k: v for k, v in report["qc_methods"].items() if k != "flags"}
    return render(
        "validation.html.j2",
        classes=classes_of(report),
        title="gliograde: external validation" + (f" ({label})" if label else ""),
        r=report,
        model=model_view(validation_model(report)),
        shared=_shared_lines(report),
        comparison=[list(row) for row in comparison_rows(report)],
        rates=rate_rows(report["metrics"]["rates"], effective_n=True, classes=classes_of(report)),
        confusion=confusion_rows(report["metrics"]["confusion_matrix"], classes_of(report)),
        figures=[_figure(folder / Path(f).name) for f in report["figures"]]
        + [_figure(Path(f)) for f in cv.get("figures") or []],
        sites=_site_rows(report),
        qc=[[n, num(e["n"]), ", ".join(e["cases"]) or "-", e["meaning"]] for n, e in report["cohort"]["qc"].items()],
        false_alarms=false_alarms(report),
        cases=_case_rows(report),
        methods={**report["methods"], "qc": qc_methods, "qc flags": relabel(FLAGS, classes_of(report))},
        ensemble=_ensemble_view(report["ensemble"]),
        stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
    )


def write_html(path: Path, report: dict) -> None:
    write_text_atomic(path, ascii_page(render_html(report, path.parent)))
