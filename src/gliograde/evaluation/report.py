"""report.html: the cross-validation summary as one self-contained page for a clinical reader.

Built from the dict `summarize()` returns (and writes as summary.json) with templates/report.html.j2: the functions
here turn the record into plain views of each section (cells formatted by the filters of gliograde.templates), the
template lays them out. The page needs nothing else: the figures are embedded as base64 PNG data URIs, the style is
inline, there is no script, and it prints. Every string taken from the report is HTML-escaped (autoescape). Keys
missing from older summaries read "n/a"; sections without data say so.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from pathlib import Path

from gliograde import GRADES, __version__
from gliograde.evaluation.metrics import METRICS, summarized
from gliograde.files import write_text_atomic
from gliograde.runs import classes_of
from gliograde.templates import NA, ci_of, num, pct, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    ("sensitivity", "Sensitivity (HGG called HGG)"),  # said of a cohort's own classes by rate_names
    ("specificity", "Specificity (LGG called LGG)"),
    ("ppv", "Positive predictive value"),
    ("npv", "Negative predictive value"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
)
fmt = num  # the name the tests and older callers know


def rate_names(classes=GRADES) -> tuple[tuple[str, str], ...]:
    """RATES with the classes' own names ("Sensitivity (IDH wildtype called IDH wildtype)")."""
    neg, pos = classes
    own = {"sensitivity": f"Sensitivity ({pos} called {pos})", "specificity": f"Specificity ({neg} called {neg})"}
    return tuple((key, own.get(key, name)) for key, name in RATES)


def figure_caption(name: str, classes=GRADES) -> str:
    pos = classes[1]
    if name == "cv_pr_curves.png":
        return f"Precision-recall curves ({pos} as the positive class), with the prevalence of {pos}."
    return FIGURE_CAPTIONS.get(name, name)


# ------------------------------------------------------------------------------------------------------ helpers
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


def ci_cell(d) -> dict:
    """A table cell holding the interval of `d`, muted (macros.html.j2 `cell`)."""
    return {"ci": ci_of(d)}


def _ci_name(record) -> str:
    method = str(record.get("method", "")) if isinstance(record, dict) else ""
    return "Newcombe" if method.startswith("Newcombe") else "DeLong" if method or record else "n/a"


def model_view(model: dict | None) -> dict:
    """The network, depth, input and preset of the page's first line under the title (a summary, a validation)."""
    m = model if isinstance(model, dict) else {}
    mods, size = m.get("modalities"), m.get("size")
    if mods is None and size is None:
        channels = None
    elif isinstance(mods, list):
        channels = f"{len(mods)} channel(s): {', '.join(map(str, mods))}"
    else:
        channels = str(mods if mods is not None else "?")
    return {"network": m.get("network"), "depth": m.get("depth"), "layout": m.get("layout"), "channels": channels,
            "size": size if size is not None else "?", "preset": m.get("preset")}  # fmt: skip


def png_uri(path: Path | None) -> str | None:
    """The file as a data URI; None where it is missing or not a PNG."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii") if data.startswith(PNG_SIGNATURE) else None


# ------------------------------------------------------------------------------------------------------- sections
def header_view(report: dict) -> dict:
    k, protocol = report.get("k"), report.get("protocol") or "unknown"
    return {
        "title": f"{k}-fold cross-validation" if k is not None else "Cross-validation",
        "partial": bool(report.get("partial")),
        "model": model_view(report.get("model")),
        "results_dir": report.get("results_dir", NA),
        "cls": protocol if protocol in PROTOCOL_EXPLAINED else "",
        "label": report.get("protocol_label") or "protocol not recorded",
        "explained": PROTOCOL_EXPLAINED.get(protocol, ""),
        "warn": protocol in ("outer", "mixed"),
    }


def data_facts(report: dict) -> list[tuple]:
    """(key, value, sub) of the Data section."""
    p = report.get("pooled") or {}
    neg, pos = classes_of(report)
    hgg, lgg = _get(p, "per_class", pos, "support"), _get(p, "per_class", neg, "support")
    rep = report.get("over_repeats") or {}
    audit = report.get("sites") or {}
    table = audit.get("sites") or {}
    known = [s for s in table if s != "unknown"]
    single = [s for s in known if _get(table, s, "single_grade")]
    with_site = audit.get("patients_with_known_site")
    return [
        ("Patients", num(p.get("n")), f"{num(hgg)} {pos} · {num(lgg)} {neg}" if hgg is not None or lgg is not None
         else ""),
        ("Folds (K)", num(report.get("k")), f"{len(report.get('folds') or [])} fold runs reported"),
        ("Repeats", num(rep.get("n_repeats", len(report.get("repeats") or []) or None))),
        ("Acquisition sites", num(len(known)) if table else NA, f"{len(single)} hold a single grade" if table else ""),
        ("Patients in single-grade sites", num(audit.get("patients_in_single_grade_sites")),
         f"of {num(with_site)} with a known site" if with_site is not None else ""),
    ]  # fmt: skip


def headline_view(report: dict) -> dict | None:
    h = report.get("headline")
    if not isinstance(h, dict):
        return None
    facts = [
        ("AUC, mean of the folds", f"{num(h.get('auc_mean_of_folds'))} ± {num(h.get('auc_std_of_folds'))}",
         f"mean ± SD over {num(h.get('auc_folds'))} per-fold AUCs: the headline"),
        ("AUC, pooled out-of-fold", num(h.get("auc_pooled")),
         f"95 % CI {ci_of(h.get('auc_pooled_ci95'))} (Newcombe): secondary"),
    ]  # fmt: skip
    return {"facts": facts, "explanation": h.get("explanation", "")}


def folds_view(report: dict) -> dict | None:
    """The per-fold table; its mean ± SD row's label spans the columns before the AUC, rather than widening the
    first (paired columns share a cell, so that the table fits a 1280 px window: tests/test_report.py measures it)."""
    rows = report.get("folds") or []
    if not rows:
        return None
    many = len({r.get("repeat", 0) for r in rows}) > 1
    added = [spec.name for spec in summarized() if spec.compute is not None]  # registered metrics, after F1
    rates = ("sensitivity", "specificity", "balanced_accuracy", "f1", *added)
    neg, pos = classes_of(report)
    head = ["Repeat"] * many + ["Fold", f"Patients ({pos}/{neg})", "Best epoch (checkpoint)", "Threshold", "AUC"]
    head += ["AUC 95 % CI", "Sensitivity", "Specificity", "Bal. accuracy", "F1", *(METRICS[m].label for m in added)]
    head += ["Brier", "ECE"]
    body = []
    for r in rows:
        cells = [num(r.get("repeat", 0))] * many + [num(r.get("fold"))]
        cells += [f"{num(r.get('n'))} ({num(r.get('n_hgg'))}/{num(r.get('n_lgg'))})"]
        cells += [f"{num(r.get('best_epoch'))} ({num(r.get('checkpoint'))})", num(r.get("threshold"))]
        cells += [num(r.get("auc")), ci_cell(r.get("auc_ci95", r.get("auc_ci95_delong")))]
        cells += [num(r.get(m)) for m in (*rates, "brier", "ece")]
        body.append(cells)
    mean, std, counts = report.get("mean") or {}, report.get("std") or {}, report.get("n_folds") or {}

    def ms(m):
        if m not in mean:
            return ""
        n = counts.get(m)
        note = f"n = {n} of {len(rows)}" if isinstance(n, int) and n < len(rows) else ""
        return {"text": f"{num(mean.get(m))} ± {num(std.get(m))}", "note": note}

    summary = ["Mean ± SD" + (" (partial)" if report.get("partial") else ""), ms("auc"), ""]
    summary += [ms(m) for m in rates] + ["", ""]
    return {
        "head": head, "rows": body, "summary": summary, "span": many + 4,
        "ci_name": "Newcombe score" if any("auc_ci95" in r for r in rows) else "DeLong",
        "std_definition": report.get("std_definition") or "standard deviation over folds",
        "mean_definition": report.get("mean_definition"),
    }  # fmt: skip


def repeats_view(report: dict) -> dict | None:
    rep = report.get("over_repeats") or {}
    repeats = report.get("repeats") or []
    if (rep.get("n_repeats") or len(repeats)) <= 1:
        return None
    rows = [
        [num(r.get("repeat")), num(_get(r, "pooled", "auc")),
         ci_cell(_get(r, "pooled", "auc_ci") or _get(r, "pooled", "auc_delong"))]
        for r in repeats
    ]  # fmt: skip
    return {"rows": rows, "over": rep}


def rate_rows(rates: dict, effective_n: bool = False, classes=GRADES) -> list[list]:
    """Measure, value, Wilson interval and count of each rate; with `effective_n` (a validation), balanced
    accuracy's count reads "effective n" and a rate not recorded "n/a / n/a" (else "n/a")."""
    rows = []
    for key, name in rate_names(classes):
        r = rates.get(key) or {}
        if key == "balanced_accuracy" and effective_n:
            frac = "effective n"
        else:
            frac = f"{num(r.get('k'), 0)} / {num(r.get('n'), 0)}" if r or effective_n else NA
        rows.append([name, num(r.get("value")), ci_cell(r), frac])
    return rows


def confusion_rows(cm, classes=GRADES) -> list[list] | None:
    if not (isinstance(cm, list) and len(cm) == 2 and all(isinstance(r, list) and len(r) == 2 for r in cm)):
        return None
    neg, pos = classes
    return [[f"True {neg}", num(cm[0][0]), num(cm[0][1])], [f"True {pos}", num(cm[1][0]), num(cm[1][1])]]


def pooled_view(report: dict) -> dict | None:
    p = report.get("pooled")
    if not p:
        return None
    score = p.get("auc_ci") or p.get("auc_delong") or {}  # an older summary: its DeLong record
    boot = p.get("bootstrap") or {}
    boot_sub = f"bootstrap {ci_of(p.get('auc_ci95'))}"
    if boot.get("resamples") is not None:
        boot_sub += f" ({num(boot.get('resamples'))} resamples, seed {num(boot.get('seed'))})"
    cal = p.get("calibration") or {}
    neg, pos = classes_of(report)
    facts = [
        ("Pooled AUC", num(p.get("auc")), f"95 % CI {ci_of(score)} ({_ci_name(score)})", boot_sub),
        ("Sensitivity", num(p.get("sensitivity")), f"{pos} correctly called"),
        ("Specificity", num(p.get("specificity")), f"{neg} correctly called"),
        ("Brier score", num(cal.get("brier", p.get("brier"))), "0 is perfect; lower is better"),
        ("ECE", num(cal.get("ece", p.get("ece"))), f"{num(cal.get('n_bins'))} equal-width bins"),
    ]
    rates = p.get("rates") or p.get("rates_at_0_5")
    rates = rates if isinstance(rates, dict) and rates else None
    sas = p.get("sensitivity_at_specificity")
    sas_rows = None
    if isinstance(sas, dict):
        sas_rows = [
            [f"≥ {num(key)}", num(_get(sas, key, "sensitivity")), num(_get(sas, key, "specificity")),
             num(_get(sas, key, "threshold"))]
            for key in sorted(k for k in sas if k != "protocol")
        ]  # fmt: skip
    return {
        "n": p.get("n"), "facts": facts, "error": score.get("error"),
        "rates": rate_rows(rates, classes=(neg, pos)) if rates else None,
        "rates_where": "threshold 0.5" if rates and rates.get("threshold") == 0.5 else "each fold's own threshold",
        "confusion": confusion_rows(p.get("confusion_matrix"), (neg, pos)),
        "sas": sas_rows, "sas_protocol": sas.get("protocol", "") if isinstance(sas, dict) else "",
    }  # fmt: skip


def _figure_path(name: str, report: dict, out_dir: Path) -> Path | None:
    path = Path(name)
    for candidate in (path, out_dir / path.name, Path(str(report.get("results_dir", "."))) / path.name):
        if candidate.is_file():
            return candidate
    return None


def figures_view(report: dict, out_dir: Path) -> dict:
    """The figures shown ({uri, caption}), and a line for each one that is not."""
    shown, notes = [], []
    for name in report.get("figures") or list(FIGURE_CAPTIONS):
        base = Path(str(name)).name
        path = _figure_path(str(name), report, out_dir)
        uri = png_uri(path)
        if uri is None:
            notes.append(f"{base}: {'not found' if path is None else 'not a PNG file'}, not shown.")
        else:
            shown.append({"uri": uri, "caption": figure_caption(base, classes_of(report))})
    return {"shown": shown, "notes": notes}


def _site_table(audit: dict, names=GRADES) -> tuple[list, list]:
    neg, pos = names
    rows, classes = [], []
    for site, e in (audit.get("sites") or {}).items():
        e = e if isinstance(e, dict) else {}
        single = e.get("single_grade")
        name = site if site != "unknown" else "unknown (ids naming no site; not one site)"
        rows.append([name, num(e.get("cases")), num(e.get(pos)), num(e.get(neg)), num(single),
                     num(e.get("accuracy"))])  # fmt: skip
        classes.append("flag" if single and site != "unknown" else "")
    return rows, classes


def _baseline_rows(p: dict, b: dict) -> list[list]:
    return [
        [name, num(x.get("auc")), ci_cell(x.get("auc_ci") or x.get("auc_delong")), num(x.get("sensitivity")),
         num(x.get("specificity"))]
        for name, x in (("Model (images)", p), ("Site alone", b))
    ]  # fmt: skip


def _mixed_view(c) -> dict | None:
    if not isinstance(c, dict):
        return None
    d = c.get("auc_ci") or c.get("auc_delong") or {}
    row = [num(c.get("n")), num(_get(c, "per_class", "HGG", "support")), num(_get(c, "per_class", "LGG", "support")),
           num(c.get("auc")), ci_cell(d), num(c.get("accuracy")), num(c.get("sensitivity")),
           num(c.get("specificity"))]  # fmt: skip
    return {"site": c.get("site", "2013"), "row": row, "error": d.get("error")}


def sites_view(report: dict) -> dict:
    audit = report.get("sites") or {}
    base = report.get("site_baseline") or {}
    rows, classes = _site_table(audit, classes_of(report))
    pooled = base.get("pooled")
    return {
        "rows": rows, "classes": classes,
        "in_single": audit.get("patients_in_single_grade_sites"), "with_site": audit.get("patients_with_known_site"),
        "unknown": audit.get("patients_with_unknown_site"), "known": audit.get("known_sites"),
        "baseline": _baseline_rows(report.get("pooled") or {}, pooled) if isinstance(pooled, dict) else None,
        "baseline_protocol": base.get("protocol", NA), "baseline_error": base.get("error"),
        "mixed": _mixed_view(audit.get("mixed_cohort")),
    }  # fmt: skip


def _listed(x) -> str | None:
    return ", ".join(str(v) for v in x) if isinstance(x, list) else None if x is None else str(x)


def attention_view(report: dict) -> dict | None:
    looks = report.get("attention")
    if not isinstance(looks, dict) or not looks.get("pooled"):
        return None
    a = looks["pooled"]
    layers, folds = _listed(a.get("layers")), _listed(a.get("folds_checked"))
    facts = [
        ("Grad-CAM mass on tumour", pct(a.get("mean_mass_in_mask")), f"chance {pct(a.get('mean_chance'))}"),
        ("Pointing game", num(a.get("pointing_game_accuracy")), "peak inside the tumour"),
        ("Cases checked", num(a.get("n")), f"folds {folds if folds is not None else NA}"),
    ]
    per_fold = looks.get("per_fold")
    rows = [
        [f, num(_get(v, "n")), pct(_get(v, "mean_mass_in_mask")), pct(_get(v, "mean_chance")),
         num(_get(v, "pointing_game_accuracy")), num(_get(v, "layer"))]
        for f, v in (per_fold.items() if isinstance(per_fold, dict) else [])
    ]  # fmt: skip
    return {"layers": layers if layers is not None else NA, "facts": facts, "per_fold": rows}


def runs_view(report: dict) -> dict | None:
    rows = report.get("folds") or []
    if not rows:
        return None
    many = len({r.get("repeat", 0) for r in rows}) > 1
    body = [[num(r.get("repeat", 0))] * many + [num(r.get("fold")), {"code": num(r.get("run"))}] for r in rows]
    return {"head": ["Repeat"] * many + ["Fold", "Run folder"], "rows": body}


# ----------------------------------------------------------------------------------------------------------- page
def render_report(report: dict, out_dir: Path, provenance: dict | None = None, config: dict | None = None) -> str:
    """The page as a string (figures read from the report's paths, or by name from out_dir / results_dir)."""
    report = report if isinstance(report, dict) else {}
    k = report.get("k")
    methods = report.get("methods")
    return render(
        "report.html.j2",
        classes=classes_of(report),
        title=f"gliograde: {k}-fold cross-validation report" if k is not None else "gliograde: cross-validation report",
        header=header_view(report),
        warnings=report.get("warnings") or [],
        data=data_facts(report),
        headline=headline_view(report),
        folds=folds_view(report),
        repeats=repeats_view(report),
        pooled=pooled_view(report),
        figures=figures_view(report, Path(out_dir)),
        sites=sites_view(report),
        attention=attention_view(report),
        provenance=provenance,
        config=config,
        methods=methods if isinstance(methods, dict) and methods else None,
        runs=runs_view(report),
        stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
    )


def ascii_page(page: str) -> str:
    """The page in ASCII, other characters as character references: it reads the same whatever encoding the file
    system's locale assumes."""
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(report: dict, out_dir: Path, provenance: dict | None = None, config: dict | None = None) -> Path:
    """Write out_dir/report.html (atomically) from a summary report dict; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    write_text_atomic(path, ascii_page(render_report(report, out_dir, provenance, config)))
    return path
