"""validation.md and report.html of `gliograde validate`, from the validation record (validation.json).

The page is self-contained like summarize's report.html (figures as base64 PNG data URIs, inline style, no script)
and reuses its style and helpers; every string from the record is HTML-escaped.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from pathlib import Path

from gliograde import __version__
from gliograde.data.brats import UNKNOWN_SITE
from gliograde.evaluation.report import CSS, NA, PNG_SIGNATURE, RATES, _ci_cell, _ci_of, _dl, _fact, _table, esc, fmt
from gliograde.files import write_text_atomic
from gliograde.inference.qc import FLAGS

CAPTIONS = {
    "validation_roc.png": "ROC curve of the ensemble on the validation cohort.",
    "validation_pr.png": "Precision-recall curve on the validation cohort (HGG positive), with the prevalence of HGG.",
    "validation_reliability.png": "Reliability diagram of P(HGG) on the validation cohort (10 equal-width bins).",
    "cv_roc_curves.png": "For comparison: the cross-validation's ROC curves (each fold, mean ± SD, pooled).",
    "cv_reliability.png": "For comparison: the cross-validation's reliability diagram (pooled out-of-fold).",
}


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci_text(record) -> str:
    if isinstance(record, dict) and "ci_low" in record:
        return f"{_f(record['ci_low'])}-{_f(record['ci_high'])}"
    if isinstance(record, list | tuple) and len(record) == 2:
        return f"{_f(record[0])}-{_f(record[1])}"
    return "n/a"


def _shared_lines(report: dict) -> list[str]:
    return [
        f"{s['case']}: " + ", ".join(f"{m['training_case']} (by {m['by']})" for m in s["matches"])
        for s in report["leakage"]["shared"]
    ]


def comparison_rows(report: dict) -> list[tuple[str, str, str]]:
    """(measure, validation, cross-validation) rows of the headline table."""
    m, cv = report["metrics"], report.get("cv") or {}
    ci = m.get("auc_ci") or {}
    return [
        ("Patients", str(m["n"]), str(cv.get("n", "n/a"))),
        ("AUC", f"{_f(m['auc'])} (95 % CI {_ci_text(ci)}, Newcombe)",
         f"mean of the per-fold AUCs {_f(cv.get('auc_mean_of_folds'))} ± {_f(cv.get('auc_std_of_folds'))} (SD)"),
        ("Pooled AUC", "(one ensemble: the AUC above)",
         f"{_f(cv.get('auc_pooled'))} (95 % CI {_ci_text(cv.get('auc_pooled_ci95'))}, Newcombe)"),
        ("Sensitivity (HGG)", _f(m["sensitivity"]), _f(cv.get("sensitivity"))),
        ("Specificity (LGG)", _f(m["specificity"]), _f(cv.get("specificity"))),
        ("Balanced accuracy", _f(m["balanced_accuracy"]), _f(cv.get("balanced_accuracy"))),
        ("Brier", _f(m["calibration"]["brier"]), _f(cv.get("brier"))),
        ("ECE (10 equal-width bins)", _f(m["calibration"]["ece"]), _f(cv.get("ece"))),
        ("Threshold", f"ensemble {_f(m['threshold'])}", str(cv.get("threshold", "n/a"))),
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
def write_markdown(path: Path, report: dict) -> None:
    m, label = report["metrics"], report.get("label")
    md = [f"# {report['title']}", ""]
    if label:
        md += [f"> **{label}.** These cases share a patient with the training folds:", ""]
        md += [f"> - {line}" for line in _shared_lines(report)] + [""]
    md += [f"Ensemble: `{report['runs']}` ({len(report['ensemble']['members'])} model(s)); cohort: "
           f"`{report['data_root']}` [{report['layout']}], {m['n']} patients ({m['n_hgg']} HGG, {m['n_lgg']} LGG); "
           f"test-time augmentation: {report.get('tta') or 'none'}.", ""]  # fmt: skip
    md += [f"> **Warning.** {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    md += ["## Validation beside the cross-validation", "", "| | Validation | Cross-validation |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in comparison_rows(report)]
    md += [
        "",
        f"Cross-validation figures: {(report.get('cv') or {}).get('source', (report.get('cv') or {}).get('error'))}.",
    ]
    md += ["", "## At the ensemble's operating point", "", report["ensemble"]["operating_point_explained"], ""]
    md += ["| Measure | Value | 95 % CI (Wilson) | Count |", "|---|---|---|---|"]
    rates = m["rates"]
    for key, name in RATES:
        r = rates.get(key) or {}
        count = f"{r.get('k', 0):.0f} / {r.get('n', 0):.0f}" if key != "balanced_accuracy" else "effective n"
        md.append(f"| {name} | {_f(r.get('value'))} | {_ci_text(r)} | {count} |")
    md += ["", f"Confusion matrix (rows true LGG/HGG, columns predicted): {m['confusion_matrix']}.", ""]
    md += [
        "## Sites",
        "",
        "| Site | Cases | HGG | LGG | Single grade | Accuracy | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, e in report["sites"]["sites"].items():
        single = "n/a" if e["single_grade"] is None else "yes" if e["single_grade"] else "no"
        name = f"{site} (ids naming no site; not one site)" if site == UNKNOWN_SITE else site
        md.append(f"| {name} | {e['cases']} | {e['HGG']} | {e['LGG']} | {single} | {_f(e['accuracy'])} | "
                  f"{_f(e['auc'])} |")  # fmt: skip
    base = report.get("site_baseline") or {}
    if "auc_ci" in base:
        md += ["", f"Site-only baseline (fitted on the training patients' sites): AUC {_f(base.get('auc'))} "
               f"(95 % CI {_ci_text(base['auc_ci'])}), against the model's {_f(m['auc'])}."]  # fmt: skip
    elif base.get("error"):
        md += ["", f"Site-only baseline not computed: {base['error']}."]
    md += ["", "## Input quality", "", "| Flag | Cases | Meaning |", "|---|---|---|"]
    for name, e in report["cohort"]["qc"].items():
        md.append(f"| {name} | {e['n']} | {e['meaning']} |")
    md += ["", f"Out of distribution: {report['qc_methods'].get('out_of_distribution')}. {false_alarms(report)}", ""]
    md += ["## Cases", "", "| Case | True | Site | P(HGG) | Threshold | Called | QC flags | Shared with training |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["predictions"]:
        shared = ", ".join(x["training_case"] for x in r.get("shared_with_training") or []) or ""
        md.append(f"| {r['case']} | {r['true_grade']} | {r['site']} | {_f(r['p_hgg'])} | {_f(r['threshold'])} | "
                  f"{r['predicted_grade']} | {' '.join(r['qc']['flags']) or '-'} | {shared} |")  # fmt: skip
    md += ["", "## Methods", "", *(f"- **{k}**: {v}" for k, v in report["methods"].items()), ""]
    md += ["## Figures", "", *(f"- {Path(f).name}" for f in report["figures"]), ""]
    write_text_atomic(path, "\n".join(md))


# ---------------------------------------------------------------------------------------------------------- html
def _img(path: Path, caption: str) -> str:
    data = path.read_bytes() if path.is_file() else b""
    if not data.startswith(PNG_SIGNATURE):
        return f'<p class="note">{esc(path.name)}: not found, not shown.</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def render(report: dict, folder: Path) -> str:
    m, label = report["metrics"], report.get("label")
    parts = [
        "<header><h1>Glioma grade (HGG vs LGG): external validation"
        + (f'<span class="badge">{esc(label)}</span>' if label else "")
        + "</h1>",
        f'<p class="subtitle">gliograde · ensemble <code>{esc(report["runs"])}</code> · cohort '
        f"<code>{esc(report['data_root'])}</code> ({esc(report['layout'])})</p>",
    ]
    if label:
        items = "".join(f"<li>{esc(line)}</li>" for line in _shared_lines(report))
        parts.append(f'<div class="banner outer"><div class="label">{esc(label)}</div><p>These cases share a patient '
                     f"with the training folds; the figures below are not an external validation.</p><ul>{items}</ul>"
                     "</div>")  # fmt: skip
    else:
        by = " and ".join(report["leakage"]["checked_by"])
        parts.append(f'<div class="banner inner"><div class="label">No patient shared with the training folds</div>'
                     f"<p>Checked by {esc(by)} against {fmt(report['leakage']['training_cases'])} training "
                     "patients.</p></div>")  # fmt: skip
    parts.append("</header>")
    if report["warnings"]:
        items = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"])
        parts.append(
            f'<section class="warnings"><h2>Warnings ({len(report["warnings"])})</h2><ul>{items}</ul></section>'
        )
    c = report["cohort"]
    facts = [
        _fact("Patients", fmt(c["n"]), f"{fmt(c['n_hgg'])} HGG · {fmt(c['n_lgg'])} LGG"),
        _fact("Acquisition sites", fmt(c["sites"]), f"{fmt(c['patients_with_unknown_site'])} patients without a site"),
        _fact("AUC", fmt(m["auc"]), f"95 % CI {_ci_of(m.get('auc_ci'))} (Newcombe)"),
        _fact("Brier score", fmt(m["calibration"]["brier"]), "0 is perfect"),
        _fact("ECE", fmt(m["calibration"]["ece"]), "10 equal-width bins"),
        _fact("QC-flagged cases", fmt(c["qc_flagged_cases"]), f"of {fmt(c['n'])}"),
    ]
    parts.append('<section><h2>Cohort</h2><div class="facts">' + "".join(facts) + "</div></section>")
    rows = [[esc(a), esc(b), esc(cc)] for a, b, cc in comparison_rows(report)]
    cv = report.get("cv") or {}
    parts.append(
        "<section><h2>Validation beside the cross-validation</h2>"
        + _table(["", "Validation cohort (one ensemble)", "Cross-validation"], rows)
        + f'<p class="note">Cross-validation figures: {esc(cv.get("source", cv.get("error", NA)))}. The validation '
        "decisions use the ensemble's threshold, the cross-validation's each fold's own.</p></section>"
    )
    body = []
    for key, name in RATES:
        r = m["rates"].get(key) or {}
        count = f"{fmt(r.get('k'), 0)} / {fmt(r.get('n'), 0)}" if key != "balanced_accuracy" else "effective n"
        body.append([esc(name), fmt(r.get("value")), _ci_cell(_ci_of(r)), count])
    cm = m["confusion_matrix"]
    parts.append(
        "<section><h2>At the ensemble's operating point</h2>"
        f"<p>{esc(report['ensemble']['operating_point_explained'])}</p>"
        + _table(["Measure", "Value", "95 % CI (Wilson)", "Count"], body)
        + '<div style="max-width:420px">'
        + _table(["", "Predicted LGG", "Predicted HGG"],
                 [["True LGG", fmt(cm[0][0]), fmt(cm[0][1])], ["True HGG", fmt(cm[1][0]), fmt(cm[1][1])]])
        + "</div></section>"
    )  # fmt: skip
    figs = [_img(folder / Path(f).name, CAPTIONS.get(Path(f).name, Path(f).name)) for f in report["figures"]]
    figs += [_img(Path(f), CAPTIONS.get(Path(f).name, Path(f).name)) for f in cv.get("figures") or []]
    parts.append('<section><h2>Figures</h2><div class="figures">' + "".join(figs) + "</div></section>")
    site_rows, cls = [], []
    for site, e in report["sites"]["sites"].items():
        name = esc(site) if site != UNKNOWN_SITE else "unknown (ids naming no site; not one site)"
        site_rows.append([name, fmt(e["cases"]), fmt(e["HGG"]), fmt(e["LGG"]), fmt(e["single_grade"]),
                          fmt(e["accuracy"]), fmt(e["sensitivity"]), fmt(e["specificity"]), fmt(e["auc"])])  # fmt: skip
        cls.append("flag" if e["single_grade"] else "")
    base = report.get("site_baseline") or {}
    base_text = (
        f"Site-only baseline (logistic regression on the sites of the training patients): AUC {fmt(base.get('auc'))}, "
        f"95 % CI {_ci_of(base.get('auc_ci'))}, against the model's {fmt(m['auc'])}."
        if "auc_ci" in base else f"Site-only baseline not computed: {base.get('error', NA)}."
    )  # fmt: skip
    parts.append(
        "<section><h2>Sites</h2>"
        + _table(["Site", "Patients", "HGG", "LGG", "Single grade", "Accuracy", "Sensitivity", "Specificity", "AUC"],
                 site_rows, cls=cls)
        + f"<p>{esc(base_text)}</p></section>"
    )  # fmt: skip
    qc_rows = [[esc(n), fmt(e["n"]), esc(", ".join(e["cases"]) or "-"), esc(e["meaning"])]
               for n, e in c["qc"].items()]  # fmt: skip
    parts.append(
        "<section><h2>Input quality</h2>"
        + _table(["Flag", "Cases", "Which", "Meaning"], qc_rows)
        + f'<p class="note">Out of distribution: {esc(report["qc_methods"].get("out_of_distribution", NA))}. '
        f"{esc(false_alarms(report))}</p>"
        "</section>"
    )
    case_rows, cls = [], []
    for r in report["predictions"]:
        shared = ", ".join(x["training_case"] for x in r.get("shared_with_training") or [])
        case_rows.append([esc(r["case"]), esc(r["true_grade"]), esc(r["site"]), fmt(r["p_hgg"], 4),
                          fmt(r["threshold"], 4), esc(r["predicted_grade"]), esc(" ".join(r["qc"]["flags"]) or "-"),
                          esc(shared or "-")])  # fmt: skip
        cls.append("flag" if r["qc"]["flags"] or shared else "")
    parts.append(
        "<section><h2>Cases</h2>"
        + _table(["Case", "True grade", "Site", "P(HGG)", "Threshold", "Called", "QC flags", "Shared with training"],
                 case_rows, cls=cls, table_cls="compact")
        + "</section>"
    )  # fmt: skip
    parts.append("<details><summary>Methods</summary>" + _dl({**report["methods"], "qc": {k: v for k, v in
                 report["qc_methods"].items() if k != "flags"}, "qc flags": FLAGS}) + "</details>")  # fmt: skip
    parts.append("<details><summary>Ensemble</summary>" + _dl({"members": {x["name"]: x["checkpoint"] for x in
                 report["ensemble"]["members"]}, "threshold": report["ensemble"]["threshold"],
                 "threshold rule": report["ensemble"]["threshold_rule"]}) + "</details>")  # fmt: skip
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<footer>Generated {esc(stamp)} by gliograde {esc(__version__)}. Research software: not a medical "
                 "device; not for clinical decisions.</footer>")  # fmt: skip
    title = "gliograde: external validation" + (f" ({label})" if label else "")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        "<body><main>" + "\n".join(parts) + "</main></body></html>\n"
    )


def write_html(path: Path, report: dict) -> None:
    page = render(report, path.parent)
    write_text_atomic(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
