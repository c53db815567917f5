"""report.html: the cross-validation summary as one self-contained page for a clinical reader.

Built from the dict `summarize()` returns (and writes as summary.json). The page needs nothing else: the figures are
embedded as base64 PNG data URIs, the style is inline, there is no script, and it prints. Every string taken from the
report is HTML-escaped. Keys missing from older summaries read "n/a"; sections without data say so.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from gliograde import __version__
from gliograde.files import write_text_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NA = "n/a"
PROTOCOL_EXPLAINED = {
    "outer": (
        "Each fold's training epoch and checkpoint were chosen by looking at the very patients that fold then "
        "reports. The numbers on this page are therefore optimistic (biased upwards) and are not an estimate of "
        "performance on new patients. Rerun with --selection inner for unbiased numbers."
    ),
    "inner": (
        "Epochs, checkpoints, decision thresholds and calibration were chosen on a selection part of each fold's "
        "training patients. Every reported patient was scored once, by a model that neither trained nor was tuned "
        "on it."
    ),
    "mixed": (
        "Some folds were selected on their reported patients (optimistic), others on an inner selection part: the "
        "pooled numbers combine the two and mean neither."
    ),
}
FIGURE_CAPTIONS = {
    "cv_roc_curves.png": "ROC curves: each fold, the mean over folds (±1 SD band) and the pooled out-of-fold curve.",
    "cv_pr_curves.png": "Precision-recall curves (HGG as the positive class), with the prevalence of HGG.",
    "cv_reliability.png": "Reliability diagram of the pooled out-of-fold probabilities (calibration).",
}
RATES = (
    ("sensitivity", "Sensitivity (HGG called HGG)"),
    ("specificity", "Specificity (LGG called LGG)"),
    ("ppv", "Positive predictive value"),
    ("npv", "Negative predictive value"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
)

CSS = """
:root { --ink: #1d2430; --muted: #5b6472; --line: #d6dbe3; --soft: #f4f6f9; --accent: #1f4e8c;
        --warn-bg: #fff4e0; --warn-line: #e0a030; --bad-bg: #fdecec; --bad-line: #c0392b; --ok-bg: #eaf6ee;
        --ok-line: #2e8b57; }
* { box-sizing: border-box; }
html { font-size: 16px; }
body { margin: 0; color: var(--ink); background: #fff;
       font-family: "Segoe UI", "Helvetica Neue", Helvetica, Arial, "Noto Sans", sans-serif; line-height: 1.5; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 1.75rem; line-height: 1.25; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line);
     color: var(--accent); }
h3 { font-size: 1.05rem; margin: 20px 0 8px; }
p { margin: 6px 0 10px; }
.subtitle { color: var(--muted); margin: 0 0 18px; }
.muted, .note { color: var(--muted); font-size: 0.9rem; }
.banner { border-left: 6px solid var(--accent); background: var(--soft); padding: 12px 16px; margin: 14px 0;
          border-radius: 4px; }
.banner .label { font-size: 1.15rem; font-weight: 700; margin: 0 0 4px; }
.banner.outer, .banner.mixed { border-color: var(--bad-line); background: var(--bad-bg); }
.banner.outer .label, .banner.mixed .label { color: var(--bad-line); }
.banner.inner { border-color: var(--ok-line); background: var(--ok-bg); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8rem; font-weight: 700;
         vertical-align: middle; margin-left: 6px; background: var(--bad-line); color: #fff; }
.warnings { border: 1px solid var(--warn-line); background: var(--warn-bg); border-radius: 4px;
            padding: 10px 16px; margin: 14px 0; }
.warnings h2 { border: 0; margin: 0 0 4px; padding: 0; color: #8a5a00; font-size: 1.1rem; }
.warnings ul { margin: 4px 0; padding-left: 20px; }
.warnings li { margin: 4px 0; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 10px; margin: 10px 0; }
.fact { border: 1px solid var(--line); border-radius: 4px; padding: 8px 12px; background: #fff; }
.fact .k { color: var(--muted); font-size: 0.8rem; text-transform: uppercase; letter-spacing: 0.03em; }
.fact .v { font-size: 1.3rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.fact .s { color: var(--muted); font-size: 0.85rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 6px; font-size: 0.9rem;
        font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; border-bottom: 2px solid var(--line); }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.summary td { font-weight: 700; border-top: 2px solid var(--ink); background: var(--soft); }
.ci { color: var(--muted); white-space: nowrap; }
tr.summary td, table.compact td { white-space: nowrap; }
table.compact { font-size: 0.85rem; }
table.compact th, table.compact td { padding: 5px 6px; }
.narrow { max-width: 760px; }
tr.flag td { background: var(--warn-bg); }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 4px; padding: 8px; background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 6px; }
.compare { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; max-width: 640px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0; font-size: 0.9rem; }
dt { font-weight: 600; color: var(--muted); }
dd { margin: 0; word-break: break-all; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
dd dl { margin: 0 0 4px; }
.dirty { color: var(--bad-line); font-weight: 700; }
details { border: 1px solid var(--line); border-radius: 4px; padding: 6px 12px; margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
footer { margin-top: 36px; color: var(--muted); font-size: 0.8rem; border-top: 1px solid var(--line);
         padding-top: 8px; }
@media print {
  html { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  table, figure, .banner, .warnings, .fact, dl { break-inside: avoid; }
  .figures { grid-template-columns: 1fr 1fr; }
  .table-wrap { overflow: visible; }
  details > summary { list-style: none; }
  details::details-content { content-visibility: visible; display: contents; }
  .banner, .warnings, th, tr.summary td, tr.flag td { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
@page { margin: 14mm 12mm; }
"""


# ------------------------------------------------------------------------------------------------------ formatting
def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _get(d, *keys, default=None):
    """d[k1][k2]... or default where any level is missing or not a mapping (older summaries)."""
    for k in keys:
        if (isinstance(d, dict) and k in d) or (
            isinstance(d, list | tuple) and isinstance(k, int) and -len(d) <= k < len(d)
        ):
            d = d[k]
        else:
            return default
    return d


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, digits: int = 3) -> str:
    """A number with `digits` decimals; "n/a" for None, NaN or anything missing; other values escaped as text."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NA
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else esc(x)
    return esc(x)


def pct(x, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %" if _is_num(x) else NA


def ci(lo, hi, digits: int = 3) -> str:
    """ "LOW–HIGH", or "n/a" where either end is missing."""
    if not (_is_num(lo) and _is_num(hi)):
        return NA
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def _ci_of(d) -> str:
    """The interval of a DeLong / Wilson record ({ci_low, ci_high}) or of a [low, high] pair."""
    if isinstance(d, dict):
        return ci(d.get("ci_low"), d.get("ci_high"))
    if isinstance(d, list | tuple) and len(d) == 2:
        return ci(d[0], d[1])
    return NA


def _table(
    head: list[str], rows: list[list[str]], summary_rows: list[list[str]] = (), cls: list[str] = (), table_cls: str = ""
) -> str:
    """A table; cells are HTML already (escape before). cls: per-row class names for the body rows."""
    out = [
        f'<div class="table-wrap"><table class="{table_cls}"><thead><tr>'
        if table_cls
        else '<div class="table-wrap"><table><thead><tr>'
    ]
    out += [f"<th>{h}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        c = cls[k] if k < len(cls) and cls[k] else ""
        out.append(f'<tr class="{c}">' if c else "<tr>")
        out += [f"<td>{cell}</td>" for cell in row]
        out.append("</tr>")
    for row in summary_rows:
        out.append('<tr class="summary">' + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _ci_name(record) -> str:
    method = str(record.get("method", "")) if isinstance(record, dict) else ""
    return "Newcombe" if method.startswith("Newcombe") else "DeLong" if method or record else "n/a"


def _ci_cell(text: str) -> str:
    return f'<span class="ci">{text}</span>'


def _fact(key: str, value: str, sub: str = "") -> str:
    s = f'<div class="s">{sub}</div>' if sub else ""
    return f'<div class="fact"><div class="k">{esc(key)}</div><div class="v">{value}</div>{s}</div>'


# ------------------------------------------------------------------------------------------------------- sections
def _header(report: dict) -> str:
    k = report.get("k")
    protocol = report.get("protocol") or "unknown"
    label = report.get("protocol_label") or "protocol not recorded"
    partial = '<span class="badge">PARTIAL</span>' if report.get("partial") else ""
    title = f"{esc(k)}-fold cross-validation" if k is not None else "Cross-validation"
    explained = PROTOCOL_EXPLAINED.get(protocol, "")
    cls = protocol if protocol in PROTOCOL_EXPLAINED else ""
    lead = "<strong>Warning.</strong> " if protocol in ("outer", "mixed") else ""
    return (
        f"<header><h1>Glioma grade (HGG vs LGG): {title}{partial}</h1>"
        f'<p class="subtitle">gliograde report · results folder <code>{esc(report.get("results_dir", NA))}</code></p>'
        f'<div class="banner {cls}"><div class="label">Protocol: {esc(label)}</div>'
        + (f"<p>{lead}{esc(explained)}</p>" if explained else "")
        + "</div></header>"
    )


def _data(report: dict) -> str:
    p = report.get("pooled") or {}
    hgg = _get(p, "per_class", "HGG", "support")
    lgg = _get(p, "per_class", "LGG", "support")
    grades = f"{fmt(hgg)} HGG · {fmt(lgg)} LGG" if hgg is not None or lgg is not None else ""
    rep = report.get("over_repeats") or {}
    n_repeats = rep.get("n_repeats", len(report.get("repeats") or []) or None)
    folds = report.get("folds") or []
    audit = report.get("sites") or {}
    table = audit.get("sites") or {}
    known = [s for s in table if s != "unknown"]
    single = [s for s in known if _get(table, s, "single_grade")]
    in_single = audit.get("patients_in_single_grade_sites")
    with_site = audit.get("patients_with_known_site")
    sites_sub = f"{len(single)} hold a single grade" if table else ""
    facts = [
        _fact("Patients", fmt(p.get("n")), grades),
        _fact("Folds (K)", fmt(report.get("k")), f"{len(folds)} fold runs reported"),
        _fact("Repeats", fmt(n_repeats)),
        _fact("Acquisition sites", fmt(len(known)) if table else NA, sites_sub),
        _fact(
            "Patients in single-grade sites",
            fmt(in_single),
            f"of {fmt(with_site)} with a known site" if with_site is not None else "",
        ),
    ]
    return '<section><h2>Data</h2><div class="facts">' + "".join(facts) + "</div></section>"


def _warnings(report: dict) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f'<section class="warnings"><h2>Warnings ({len(warnings)})</h2><ul>{items}</ul></section>'


def _folds(report: dict) -> str:
    rows = report.get("folds") or []
    if not rows:
        return "<section><h2>Per fold</h2><p class='note'>No fold results in this summary.</p></section>"
    many = len({r.get("repeat", 0) for r in rows}) > 1
    head = ["Repeat"] * many + ["Fold", "Patients", "HGG/LGG", "Best epoch", "Checkpoint", "Threshold", "AUC"]
    head += ["AUC 95 % CI", "Sensitivity", "Specificity", "Bal. accuracy", "F1", "Brier", "ECE"]
    body = []
    for r in rows:
        cells = [fmt(r.get("repeat", 0))] * many + [fmt(r.get("fold")), fmt(r.get("n"))]
        cells += [f"{fmt(r.get('n_hgg'))}/{fmt(r.get('n_lgg'))}", fmt(r.get("best_epoch"))]
        cells += [fmt(r.get("checkpoint")), fmt(r.get("threshold")), fmt(r.get("auc"))]
        cells += [_ci_cell(_ci_of(r.get("auc_ci95", r.get("auc_ci95_delong"))))]
        cells += [fmt(r.get(m)) for m in ("sensitivity", "specificity", "balanced_accuracy", "f1", "brier", "ece")]
        body.append(cells)
    mean, std = report.get("mean") or {}, report.get("std") or {}
    counts = report.get("n_folds") or {}

    def ms(m):
        if m not in mean:
            return ""
        n = counts.get(m)
        of = f" (n = {n} of {len(rows)})" if isinstance(n, int) and n < len(rows) else ""
        return f"{fmt(mean.get(m))} ± {fmt(std.get(m))}{of}"

    summary = ["Mean ± SD" + (" (partial)" if report.get("partial") else "")] + [""] * (many + 5)
    summary += [ms("auc"), ""] + [ms(m) for m in ("sensitivity", "specificity", "balanced_accuracy", "f1")]
    summary += ["", ""]
    std_def = report.get("std_definition") or "standard deviation over folds"
    mean_def = report.get("mean_definition")
    ci_name = "Newcombe score" if any("auc_ci95" in r for r in rows) else "DeLong"
    return (
        "<section><h2>Per fold</h2>"
        f"<p>Each fold's model scored the patients it held out. AUC with its 95 % confidence interval ({ci_name}); "
        "sensitivity and specificity at the fold's decision threshold (HGG is the positive class). A rate a fold "
        "cannot have (specificity without LGG patients) reads n/a and stays out of the mean.</p>"
        + _table(head, body, [summary], table_cls="compact")
        + f'<p class="note">SD: {esc(std_def)}.'
        + (f" Mean: {esc(mean_def)}." if mean_def else "")
        + "</p></section>"
    )


def _headline(report: dict) -> str:
    h = report.get("headline")
    if not isinstance(h, dict):
        return ""
    n = h.get("auc_folds")
    facts = [
        _fact("AUC, mean of the folds", f"{fmt(h.get('auc_mean_of_folds'))} ± {fmt(h.get('auc_std_of_folds'))}",
              f"mean ± SD over {fmt(n)} per-fold AUCs: the headline"),
        _fact("AUC, pooled out-of-fold", fmt(h.get("auc_pooled")),
              f"95 % CI {_ci_of(h.get('auc_pooled_ci95'))} (Newcombe): secondary"),
    ]  # fmt: skip
    return (
        "<section><h2>Headline</h2>"
        + '<div class="facts">'
        + "".join(facts)
        + "</div>"
        + f"<p>{esc(h.get('explanation', ''))}</p></section>"
    )


def _methods(report: dict) -> str:
    methods = report.get("methods")
    if not isinstance(methods, dict) or not methods:
        return ""
    return "<details><summary>Statistical methods</summary>" + _dl(methods) + "</details>"


def _repeats(report: dict) -> str:
    rep = report.get("over_repeats") or {}
    repeats = report.get("repeats") or []
    if (rep.get("n_repeats") or len(repeats)) <= 1:
        return ""
    body = [
        [fmt(r.get("repeat")), fmt(_get(r, "pooled", "auc")),
         _ci_cell(_ci_of(_get(r, "pooled", "auc_ci") or _get(r, "pooled", "auc_delong")))]
        for r in repeats
    ]  # fmt: skip
    return (
        "<section><h2>Repeated cross-validation</h2>"
        + _table(["Repeat", "Pooled AUC", "95 % CI"], body)
        + f"<p>Pooled AUC over {fmt(rep.get('n_repeats'))} repeats: mean {fmt(rep.get('mean'))} ± "
        f"{fmt(rep.get('std'))} (sample SD), range {fmt(rep.get('min'))}–{fmt(rep.get('max'))}. The sections below "
        "are repeat 0's.</p></section>"
    )


def _pooled(report: dict) -> str:
    p = report.get("pooled")
    if not p:
        return "<section><h2>Pooled out-of-fold results</h2><p class='note'>Not in this summary (n/a).</p></section>"
    score = p.get("auc_ci") or p.get("auc_delong") or {}  # an older summary: its DeLong record
    boot = p.get("bootstrap") or {}
    boot_sub = f"bootstrap {_ci_of(p.get('auc_ci95'))}"
    if boot.get("resamples") is not None:
        boot_sub += f" ({fmt(boot.get('resamples'))} resamples, seed {fmt(boot.get('seed'))})"
    cal = p.get("calibration") or {}
    facts = [
        _fact("Pooled AUC", fmt(p.get("auc")), f"95 % CI {_ci_of(score)} ({_ci_name(score)})<br>{boot_sub}"),
        _fact("Sensitivity", fmt(p.get("sensitivity")), "HGG correctly called"),
        _fact("Specificity", fmt(p.get("specificity")), "LGG correctly called"),
        _fact("Brier score", fmt(cal.get("brier", p.get("brier"))), "0 is perfect; lower is better"),
        _fact("ECE", fmt(cal.get("ece", p.get("ece"))), f"{fmt(cal.get('n_bins'))} equal-width bins"),
    ]
    out = [
        "<section><h2>Pooled out-of-fold results</h2>",
        f"<p>Each of the {fmt(p.get('n'))} patients was predicted once, by the fold that held it out; the metrics "
        "below are over these concatenated predictions, which come from different models (see the headline).</p>",
        '<div class="facts">' + "".join(facts) + "</div>",
    ]
    if "error" in score:
        out.append(f'<p class="note">AUC interval not computed: {esc(score["error"])}.</p>')
    rates = p.get("rates") or p.get("rates_at_0_5")
    if isinstance(rates, dict) and rates:
        body = []
        for key, name in RATES:
            r = rates.get(key) or {}
            frac = f"{fmt(r.get('k'), 0)} / {fmt(r.get('n'), 0)}" if r else NA
            body.append([esc(name), fmt(r.get("value")), _ci_cell(_ci_of(r)), frac])
        where = "threshold 0.5" if rates.get("threshold") == 0.5 else "each fold's own threshold"
        out += [
            f"<h3>Rates at {where}, with 95 % Wilson confidence intervals</h3>",
            _table(["Measure", "Value", "95 % CI (Wilson)", "Count"], body),
        ]
    else:
        out.append('<p class="note">Rates with Wilson intervals: n/a (older summary).</p>')
    cm = p.get("confusion_matrix")
    if isinstance(cm, list) and len(cm) == 2 and all(isinstance(r, list) and len(r) == 2 for r in cm):
        body = [["True LGG", fmt(cm[0][0]), fmt(cm[0][1])], ["True HGG", fmt(cm[1][0]), fmt(cm[1][1])]]
        out += [
            "<h3>Confusion matrix (at each fold's decision threshold)</h3>",
            '<div style="max-width:420px">' + _table(["", "Predicted LGG", "Predicted HGG"], body) + "</div>",
        ]
    sas = p.get("sensitivity_at_specificity")
    if isinstance(sas, dict):
        body = []
        for key in sorted(k for k in sas if k != "protocol"):
            s = sas.get(key) or {}
            target = f"≥ {fmt(key)}"
            body.append([target, fmt(s.get("sensitivity")), fmt(s.get("specificity")), fmt(s.get("threshold"))])
        out += [
            "<h3>Sensitivity at fixed specificity</h3>",
            '<div style="max-width:640px">'
            + _table(["Target specificity", "Sensitivity", "Achieved specificity", "Threshold"], body)
            + "</div>",
            f'<p class="note">{esc(sas.get("protocol", ""))}</p>',
        ]
    out.append("</section>")
    return "".join(out)


def _figure_path(name: str, report: dict, out_dir: Path) -> Path | None:
    path = Path(name)
    for candidate in (path, out_dir / path.name, Path(str(report.get("results_dir", "."))) / path.name):
        if candidate.is_file():
            return candidate
    return None


def _figures(report: dict, out_dir: Path) -> str:
    names = report.get("figures") or list(FIGURE_CAPTIONS)
    figs, notes = [], []
    for name in names:
        base = Path(str(name)).name
        path = _figure_path(str(name), report, out_dir)
        data = path.read_bytes() if path else b""
        if not data.startswith(PNG_SIGNATURE):
            why = "not found" if path is None else "not a PNG file"
            notes.append(f"<li>{esc(base)}: {why}, not shown.</li>")
            continue
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        caption = FIGURE_CAPTIONS.get(base, base)
        figs.append(f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>')
    out = ["<section><h2>Figures</h2>"]
    if figs:
        out.append('<div class="figures">' + "".join(figs) + "</div>")
    if notes:
        out.append('<ul class="note">' + "".join(notes) + "</ul>")
    if not figs and not notes:
        out.append('<p class="note">No figures in this summary.</p>')
    out.append("</section>")
    return "".join(out)


def _sites(report: dict) -> str:
    audit = report.get("sites") or {}
    table = audit.get("sites") or {}
    out = [
        "<section><h2>Site audit</h2>",
        "<p>Where an acquisition site holds a single grade, the site alone predicts the grade: a high AUC may then "
        "partly measure the scanner or institution rather than the tumour.</p>",
    ]
    if table:
        body, cls = [], []
        for site, e in table.items():
            e = e if isinstance(e, dict) else {}
            single = e.get("single_grade")
            name = esc(site) if site != "unknown" else "unknown (ids naming no site; not one site)"
            body.append(
                [name, fmt(e.get("cases")), fmt(e.get("HGG")), fmt(e.get("LGG")), fmt(single),
                 fmt(e.get("accuracy"))]
            )  # fmt: skip
            cls.append("flag" if single and site != "unknown" else "")
        head = ["Site", "Patients", "HGG", "LGG", "Single grade", "Model accuracy"]
        out.append('<div class="narrow">' + _table(head, body, cls=cls) + "</div>")
        out.append(
            f'<p class="note">{fmt(audit.get("patients_in_single_grade_sites"))} of '
            f"{fmt(audit.get('patients_with_known_site'))} patients with a known site come from a single-grade site "
            "(highlighted)"
            + (
                f"; {fmt(audit.get('patients_with_unknown_site'))} more have ids that name no site, counted apart"
                if audit.get("patients_with_unknown_site")
                else ""
            )
            + ". Model accuracy at each patient's own fold's threshold.</p>"
        )
    else:
        out.append('<p class="note">Site table: n/a.</p>')

    p = report.get("pooled") or {}
    base = report.get("site_baseline") or {}
    out.append("<h3>Site-only baseline</h3>")
    if isinstance(base.get("pooled"), dict):
        b = base["pooled"]
        body = [
            ["Model (images)", fmt(p.get("auc")), _ci_cell(_ci_of(p.get("auc_ci") or p.get("auc_delong"))),
             fmt(p.get("sensitivity")), fmt(p.get("specificity"))],
            ["Site alone", fmt(b.get("auc")), _ci_cell(_ci_of(b.get("auc_ci") or b.get("auc_delong"))),
             fmt(b.get("sensitivity")), fmt(b.get("specificity"))],
        ]  # fmt: skip
        out += [
            '<div class="narrow">'
            + _table(["Predictor", "Pooled AUC", "95 % CI (Newcombe)", "Sensitivity", "Specificity"], body)
            + "</div>",
            "<p>The baseline is a logistic regression on the site read from the case id, trained on the same folds "
            f"with protocol {esc(base.get('protocol', NA))}. What the site alone predicts is not evidence that the "
            "images were read; the model's AUC means most where it clearly exceeds the baseline's.</p>",
        ]
    elif base.get("error"):
        out.append(f'<p class="note">Not computed: {esc(base["error"])}.</p>')
    else:
        out.append('<p class="note">Not in this summary (n/a).</p>')

    c = audit.get("mixed_cohort")
    if isinstance(c, dict):
        site = c.get("site", "2013")
        d = c.get("auc_ci") or c.get("auc_delong") or {}
        out += [
            f"<h3>The mixed-grade {esc(site)} cohort alone</h3>",
            "<p>The one site holding both grades: here the site cannot predict the grade. Decisions at each patient's "
            "own fold's threshold, as in the site table.</p>",
            '<div class="narrow">'
            + _table(
                ["Patients", "HGG", "LGG", "AUC", "95 % CI (Newcombe)", "Accuracy", "Sensitivity", "Specificity"],
                [
                    [
                        fmt(c.get("n")),
                        fmt(_get(c, "per_class", "HGG", "support")),
                        fmt(_get(c, "per_class", "LGG", "support")),
                        fmt(c.get("auc")),
                        _ci_cell(_ci_of(d)),
                        fmt(c.get("accuracy")),
                        fmt(c.get("sensitivity")),
                        fmt(c.get("specificity")),
                    ]
                ],
            )
            + "</div>",
        ]
        if "error" in d:
            out.append(f'<p class="note">AUC interval not computed: {esc(d["error"])}.</p>')
    out.append("</section>")
    return "".join(out)


def _attention(report: dict) -> str:
    looks = report.get("attention")
    if not isinstance(looks, dict) or not looks.get("pooled"):
        return ""
    a = looks["pooled"]
    layers = a.get("layers")
    layers = ", ".join(str(x) for x in layers) if isinstance(layers, list) else layers
    folds = a.get("folds_checked")
    folds = ", ".join(str(x) for x in folds) if isinstance(folds, list) else folds
    facts = [
        _fact("Grad-CAM mass on tumour", pct(a.get("mean_mass_in_mask")), f"chance {pct(a.get('mean_chance'))}"),
        _fact("Pointing game", fmt(a.get("pointing_game_accuracy")), "peak inside the tumour"),
        _fact("Cases checked", fmt(a.get("n")), f"folds {esc(folds) if folds is not None else NA}"),
    ]
    out = [
        "<section><h2>Where the model looks</h2>",
        f"<p>Grad-CAM maps at {esc(layers if layers is not None else NA)} compared with the tumour masks. "
        "“Chance” is the share a map spread uniformly over the brain would place on the tumour.</p>",
        '<div class="facts">' + "".join(facts) + "</div>",
    ]
    per_fold = looks.get("per_fold")
    if isinstance(per_fold, dict) and per_fold:
        body = [
            [esc(f), fmt(_get(v, "n")), pct(_get(v, "mean_mass_in_mask")), pct(_get(v, "mean_chance")),
             fmt(_get(v, "pointing_game_accuracy")), fmt(_get(v, "layer"))]
            for f, v in per_fold.items()
        ]  # fmt: skip
        out.append(_table(["Fold", "Cases", "Mass on tumour", "Chance", "Pointing game", "Layer"], body))
    out.append("</section>")
    return "".join(out)


def _dl(obj, depth: int = 0) -> str:
    """A mapping as a definition list, nested mappings as nested lists; a "dirty" flag that is true stands out."""
    if isinstance(obj, dict):
        if not obj:
            return "<dl><dt>(empty)</dt><dd></dd></dl>"
        items = []
        for k, v in obj.items():
            if isinstance(v, dict) and depth < 6:
                value = _dl(v, depth + 1)
            elif k == "dirty" and v is True:
                value = '<span class="dirty">yes: uncommitted changes</span>'
            else:
                value = _value(v)
            items.append(f"<dt>{esc(k)}</dt><dd>{value}</dd>")
        return "<dl>" + "".join(items) + "</dl>"
    return _value(obj)


def _value(v) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return NA if math.isnan(v) else esc(repr(v))
    if isinstance(v, list | tuple):
        if all(not isinstance(x, dict | list | tuple) for x in v):
            return esc(", ".join(_plain(x) for x in v)) if v else "(none)"
        return esc(json.dumps(v, default=str))
    if isinstance(v, dict):
        return esc(json.dumps(v, default=str))
    return esc(v)


def _plain(x) -> str:
    return NA if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


def _provenance(provenance: dict | None, config: dict | None) -> str:
    out = ["<section><h2>Provenance</h2>"]
    if provenance:
        out.append(_dl(provenance))
    else:
        out.append('<p class="note">Provenance: n/a (not recorded).</p>')
    if config:
        out.append("<details><summary>Configuration</summary>" + _dl(config) + "</details>")
    out.append("</section>")
    return "".join(out)


def _runs(report: dict) -> str:
    rows = report.get("folds") or []
    if not rows:
        return ""
    many = len({r.get("repeat", 0) for r in rows}) > 1
    body = [[fmt(r.get("repeat", 0))] * many + [fmt(r.get("fold")), f"<code>{fmt(r.get('run'))}</code>"] for r in rows]
    head = ["Repeat"] * many + ["Fold", "Run folder"]
    return "<details><summary>Run folders</summary>" + _table(head, body) + "</details>"


# ----------------------------------------------------------------------------------------------------------- page
def render_report(report: dict, out_dir: Path, provenance: dict | None = None, config: dict | None = None) -> str:
    """The page as a string (figures read from the report's paths, or by name from out_dir / results_dir)."""
    report = report if isinstance(report, dict) else {}
    k = report.get("k")
    title = f"gliograde: {k}-fold cross-validation report" if k is not None else "gliograde: cross-validation report"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        _header(report),
        _warnings(report),
        _data(report),
        _headline(report),
        _folds(report),
        _repeats(report),
        _pooled(report),
        _figures(report, Path(out_dir)),
        _sites(report),
        _attention(report),
        _provenance(provenance, config),
        _methods(report),
        _runs(report),
        f"<footer>Generated {esc(stamp)} by gliograde {esc(__version__)}. Research software: not a medical device; "
        "not for clinical decisions.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        "<body><main>" + "\n".join(s for s in body if s) + "</main></body></html>\n"
    )


def write_report(report: dict, out_dir: Path, provenance: dict | None = None, config: dict | None = None) -> Path:
    """Write out_dir/report.html (atomically) from a summary report dict; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    page = render_report(report, out_dir, provenance, config)
    # ASCII with character references: the page reads the same whatever encoding the file system's locale assumes
    write_text_atomic(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
