"""`gliograde summarize`: the cross-validation report.

Per fold: the newest complete run (or the runs named). Reported:
- the per-fold table and mean ± sample standard deviation (ddof = 1) over folds;
- pooled out-of-fold results: each patient is predicted once, by the fold that held it out, so metrics over the
  concatenated predictions use every patient; the AUC gets a seeded patient-level bootstrap 95 % interval;
- ROC and PR figures: each fold, the mean curve with a ±1 std band, and the pooled curve;
- a site audit: where a site holds one grade only, the site alone predicts the grade, and a high AUC may be
  measuring the scanner. The mixed-grade 2013 cohort is reported alone.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from gliograde import GRADES
from gliograde.data.brats import UNKNOWN_SITE, site_of
from gliograde.errors import GliogradeError
from gliograde.evaluation import stats as honest
from gliograde.evaluation.metrics import compute_metrics
from gliograde.evaluation.plots import save_figure
from gliograde.files import json_safe, write_json, write_text_atomic
from gliograde.runs import (  # noqa: F401  (FoldRun, find_runs, ...: re-exported for existing imports)
    OWN_CHECKS,
    FoldRun,
    SummaryError,
    config_differences,
    find_runs,
    label,
    read_run,
    run_order_key,
    run_status,
    shared,
    who_holds,
)

log = logging.getLogger("gliograde")
METRICS = ("auc", "f1", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
MIXED_COHORT = "2013"  # the BraTS 2013 cases: the one site of BraTS 2018 with both grades


# -------------------------------------------------------------------------------------------------- statistics
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over the folds where the value is defined (NaN ones, e.g. the
    specificity of a fold without LGG, are left out, never counted as 0; :func:`defined` counts the rest); the mean
    is NaN with no defined value, the std with fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def defined(values) -> int:
    """How many fold values a mean stands on (the non-NaN ones)."""
    return int(np.sum(~np.isnan(np.asarray(values, dtype=np.float64))))


def site_audit(ids: list[str], labels, preds=None) -> dict:
    """Cases, grades and (given predictions) accuracy per acquisition site, and how many patients sit in a site
    that holds a single grade -- for them the site alone predicts the grade."""
    labels = np.asarray(labels, dtype=np.int64)
    sites = [site_of(i) for i in ids]
    table = {}
    for site in sorted(set(sites), key=lambda s: (s == UNKNOWN_SITE, s)):  # the ids without a site last
        rows = [k for k, s in enumerate(sites) if s == site]
        counts = Counter(int(labels[k]) for k in rows)
        entry = {"cases": len(rows), "HGG": counts.get(1, 0), "LGG": counts.get(0, 0)}
        # ids that name no site are not one site: whether "they" hold one grade says nothing
        entry["single_grade"] = None if site == UNKNOWN_SITE else entry["HGG"] == 0 or entry["LGG"] == 0
        if preds is not None:
            entry["accuracy"] = float(np.mean(np.asarray(preds)[rows] == labels[rows]))
        table[site] = entry
    confounded = sum(e["cases"] for s, e in table.items() if e["single_grade"] and s != UNKNOWN_SITE)
    known = sum(e["cases"] for s, e in table.items() if s != UNKNOWN_SITE)
    return {
        "sites": table,
        "known_sites": sum(s != UNKNOWN_SITE for s in table),
        "patients_in_single_grade_sites": confounded,
        "patients_with_known_site": known,
        "patients_with_unknown_site": len(ids) - known,
        "patients": len(ids),
    }


def site_warning(audit: dict) -> str | None:
    n, known = audit["patients_in_single_grade_sites"], audit["patients_with_known_site"]
    if known == 0 or n == 0:
        return None
    unknown = audit.get("patients_with_unknown_site", audit.get("patients", known) - known)
    apart = f" ({unknown} more patients have ids that name no site: counted apart, not as a site)" if unknown else ""
    return (
        f"{n} of {known} patients with a known site come from a site that holds a single grade{apart}: for them the "
        "acquisition site alone predicts the grade, so a high AUC may partly measure the scanner or institution "
        f"rather than the tumour. See the site table, and the mixed-grade {MIXED_COHORT} cohort on its own."
    )


# ------------------------------------------------------------------------------------------------------ figures
def cv_curves(runs: list[FoldRun], pooled_labels, pooled_probs, out_dir: Path) -> tuple[Path, Path]:
    """cv_roc_curves.png and cv_pr_curves.png: per fold, mean ± 1 std over folds (interpolated), pooled."""
    grid = np.linspace(0, 1, 201)
    paths = (out_dir / "cv_roc_curves.png", out_dir / "cv_pr_curves.png")
    for kind, path in zip(("roc", "pr"), paths, strict=True):
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
        curves = []
        for r in runs:
            if len(np.unique(r.labels)) < 2:
                continue
            if kind == "roc":
                x, y, _ = roc_curve(r.labels, r.probs)
                curves.append(np.interp(grid, x, y))
                curves[-1][0] = 0.0
            else:
                y, x, _ = precision_recall_curve(r.labels, r.probs)
                x, y = x[::-1], y[::-1]  # recall increasing
                curves.append(np.interp(grid, x, y))
            ax.plot(x, y, lw=1, alpha=0.45, label=f"fold {r.fold}")
        if curves:
            c = np.array(curves)
            mean, std = c.mean(0), c.std(0, ddof=1) if len(c) > 1 else np.zeros_like(grid)
            ax.plot(grid, mean, color="navy", lw=2, label="mean over folds")
            ax.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="navy", alpha=0.15)
        if len(np.unique(pooled_labels)) == 2:
            if kind == "roc":
                x, y, _ = roc_curve(pooled_labels, pooled_probs)
            else:
                y, x, _ = precision_recall_curve(pooled_labels, pooled_probs)
            ax.plot(x, y, color="darkred", lw=2, ls="--", label="pooled out-of-fold")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=1)
            ax.set(xlabel="1 - specificity", ylabel="sensitivity (HGG)", title="ROC, cross-validation")
        else:
            ax.axhline(np.mean(pooled_labels), color="grey", ls=":", label="prevalence of HGG")
            ax.set(xlabel="recall (HGG)", ylabel="precision (HGG)", title="precision-recall, cross-validation")
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="lower right" if kind == "roc" else "lower left")
        save_figure(fig, path, dpi=110)
    return paths


# ------------------------------------------------------------------------------------------------------ report
def summarize(
    results_dir: str | Path,
    runs: list[str | Path] | None = None,
    allow_partial: bool = False,
    bootstrap: int = 2000,
    seed: int = 0,
    allow_mixed: bool = False,
) -> dict:
    """Build the report, write summary.{md,csv,json} and the figures into results_dir; return the JSON.
    Folds trained with different configurations are refused unless `allow_mixed`."""
    results_dir = Path(results_dir)
    chosen, problems = choose_runs(results_dir, runs)
    k, repeats, missing, protocol, warnings = check_runs(chosen, problems, allow_partial, allow_mixed)
    ordered = [chosen[key] for key in sorted(chosen)]
    first_repeat = [r for r in ordered if r.repeat == repeats[0]]
    rows = [fold_row(r) for r in ordered]
    stats = {m: mean_std([row[m] for row in rows]) for m in METRICS}
    per_repeat = [pool_repeat(ordered, rep, bootstrap, seed) for rep in repeats]
    first = per_repeat[0]
    pooled, labels, probs, all_ids = first["pooled"], first["labels"], first["probs"], first["ids"]
    audit = audit_sites(first_repeat, all_ids, labels, probs, warnings)
    baseline = site_baseline_for(ordered, all_ids, labels, repeats[0], protocol)
    looks = attention_of(first_repeat, rows)
    shortcut = shortcut_warning(pooled, looks)
    if shortcut:
        warnings.append(shortcut)

    n_folds = {m: defined([row[m] for row in rows]) for m in METRICS}
    report = {
        "results_dir": str(results_dir),
        "k": k,
        "protocol": protocol,
        "protocol_label": PROTOCOL_LABELS.get(protocol, protocol),
        "partial": bool(missing),
        "missing_folds": [f for rep, f in missing if rep == repeats[0]],
        "missing": [list(m) for m in missing],
        "headline": headline(stats, n_folds, len(rows), pooled),
        "folds": rows,
        "mean": {m: s[0] for m, s in stats.items()},
        "std": {m: s[1] for m, s in stats.items()},
        "n_folds": n_folds,
        "std_definition": "sample standard deviation over folds (ddof = 1)",
        "mean_definition": MEAN_DEFINITION,
        "methods": METHODS,
        "pooled": pooled,
        "repeats": [{"repeat": r["repeat"], "pooled": r["pooled"]} for r in per_repeat],
        "over_repeats": over_repeats(per_repeat),
        "configuration": shared(ordered, "config"),
        "provenance": {
            "shared": shared(ordered, "provenance"),
            "per_run": {label(r.key): r.provenance for r in ordered},
        },
        "site_baseline": baseline,
        "attention": looks,
        "sites": audit,
        "warnings": warnings,
    }
    roc_png, pr_png = cv_curves(first_repeat, labels, probs, results_dir)
    rel_png = results_dir / "cv_reliability.png"
    curves = {f"repeat {r['repeat']}": r["pooled"]["calibration"]["reliability"] for r in per_repeat}
    save_figure(honest.reliability_figure(curves), rel_png)
    report["figures"] = [str(roc_png), str(pr_png), str(rel_png)]
    report["report_html"] = str(results_dir / "report.html")
    _write(results_dir, report)
    from gliograde.evaluation.report import write_report

    write_report(report, results_dir, report["provenance"]["shared"], report["configuration"])
    return report


def choose_runs(results_dir: Path, runs) -> tuple[dict, dict]:
    """The runs named by --runs (one per fold), else the newest complete run of each fold; (runs, problems)."""
    if runs:
        chosen = {}
        for r in runs:
            fr = read_run(Path(r))
            if fr.key in chosen:
                raise SummaryError(f"--runs names two runs of {label(fr.key)}: {chosen[fr.key].run_dir} and {r}")
            chosen[fr.key] = fr
        problems = {}
    else:
        chosen, problems = find_runs(results_dir)
    if not chosen:
        detail = "; ".join(f"{label(key)}: {why}" for key, why in sorted(problems.items()))
        raise SummaryError(f"no complete run under {results_dir}" + (f" ({detail})" if detail else ""))
    return chosen, problems


def check_runs(chosen: dict, problems: dict, allow_partial: bool, allow_mixed: bool):
    """Whether the runs make one CV: one K, one configuration, one protocol, one split, every fold. Refused in one
    line unless allowed (then labelled in the warnings). Returns (K, repeats, missing folds, protocol, warnings)."""
    ks = {r.folds for r in chosen.values()}
    if len(ks) > 1:
        raise SummaryError(f"the runs were trained with different numbers of folds {sorted(ks)}: not one CV")
    k = ks.pop()
    warnings = []
    differ = config_differences(list(chosen.values()))
    if differ:
        detail = "; ".join(
            f"{k}: " + ", ".join(f"{who}={json.dumps(v)}" for who, v in values.items()) for k, values in differ.items()
        )
        if not allow_mixed:
            raise SummaryError(
                f"the folds were trained with different configurations ({detail}); a summary over them would mix "
                "models. Retrain the odd folds, name the runs with --runs, or pass --allow-mixed"
            )
        warnings.append(f"MIXED configurations ({detail})")
    protocols = sorted({r.protocol for r in chosen.values()})
    if len(protocols) > 1:
        detail = who_holds(chosen, "protocol")
        if not allow_partial:
            raise SummaryError(
                f"the runs mix selection protocols ({detail}): their numbers mean different things. Retrain with one "
                "--selection, or pass --allow-partial for a summary labelled mixed"
            )
        warnings.append(f"MIXED protocols ({detail}): the pooled numbers combine inner- and outer-selected folds")
    if len({r.split for r in chosen.values()}) > 1:
        detail = who_holds(chosen, "split")
        if not allow_partial:
            raise SummaryError(
                f"the runs come from different splits (K, seed, repeats, grouping, inner part: {detail}); a summary "
                "over them pools patients of incompatible folds. Pass --allow-partial for one labelled mixed"
            )
        warnings.append(f"MIXED splits ({detail})")
    repeats = sorted({r.repeat for r in chosen.values()})
    missing = [(rep, f) for rep in repeats for f in range(k) if (rep, f) not in chosen]
    if missing:
        detail = ", ".join(f"{label(key)} ({problems.get(key, 'no run')})" for key in missing)
        if not allow_partial:
            raise SummaryError(
                f"{k}-fold CV incomplete: {detail}. Train the missing folds (gliograde cv resumes them), or pass "
                "--allow-partial for a summary labelled partial"
            )
        log.warning("PARTIAL summary: %d of %d folds; missing %s", len(chosen), k * len(repeats), detail)
        warnings.insert(0, f"PARTIAL: missing {', '.join(label(m) for m in missing)}; not a complete {k}-fold result")
    protocol = protocols[0] if len(protocols) == 1 else "mixed"
    if protocol == "outer":
        warnings.append(
            "selected on the reported folds (optimistic): every fold's epoch and checkpoint were chosen on the "
            "patients it reports (--selection outer, the seeds' protocol); use --selection inner for unbiased numbers"
        )
    return k, repeats, missing, protocol, warnings


def pool_repeat(ordered: list[FoldRun], rep: int, bootstrap: int, seed: int) -> dict:
    """One repeat's out-of-fold predictions pooled (each patient once, by the fold that held it out) and scored at
    each fold's own threshold, with the stratified bootstrap interval and the honest statistics."""
    rruns = [r for r in ordered if r.repeat == rep]
    ids = [i for r in rruns for i in r.ids]
    duplicated = sorted(i for i, c in Counter(ids).items() if c > 1)
    if duplicated:
        raise SummaryError(
            f"patients validated in more than one fold of repeat {rep} ({duplicated[:5]}...): the runs used "
            "different splits"
        )
    labels = np.concatenate([r.labels for r in rruns])
    probs = np.concatenate([r.probs for r in rruns])
    pooled = compute_metrics(labels, probs, threshold_of(rruns))
    boot = honest.bootstrap_auc(labels, probs, bootstrap, seed)
    pooled.update(
        {
            "auc_ci95": [boot["ci_low"], boot["ci_high"]],
            "bootstrap": {"resamples": bootstrap, "seed": seed, **BOOTSTRAP},
        }
    )
    pooled.update(honest.honest_statistics(labels, probs, threshold_of(rruns)))
    return {"repeat": rep, "ids": ids, "labels": labels, "probs": probs, "pooled": pooled}


def over_repeats(per_repeat: list[dict]) -> dict:
    aucs = [r["pooled"]["auc"] for r in per_repeat]
    return {
        "n_repeats": len(per_repeat),
        "pooled_auc": aucs,
        "mean": float(np.mean(aucs)),
        "std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else math.nan,
        "min": float(np.min(aucs)),
        "max": float(np.max(aucs)),
    }


def audit_sites(first_repeat: list[FoldRun], all_ids, labels, probs, warnings: list[str]) -> dict:
    """The site audit and the mixed-grade 2013 cohort, at one operating point everywhere: each patient at its own
    fold's threshold. A warning joins `warnings` where single-grade sites could carry the AUC."""
    thresholds = np.broadcast_to(threshold_of(first_repeat), probs.shape)
    preds = (probs >= thresholds).astype(np.int64)
    audit = site_audit(all_ids, labels, preds)
    cohort = [k_ for k_, i in enumerate(all_ids) if site_of(i) == MIXED_COHORT]
    if cohort:
        audit["mixed_cohort"] = {
            "site": MIXED_COHORT,
            **compute_metrics(labels[cohort], probs[cohort], thresholds[cohort]),
            "threshold": "each patient's own fold's threshold (as in the site table)",
            "auc_ci": auc_ci_or_reason(labels[cohort], probs[cohort]),
            "auc_delong": delong_or_reason(labels[cohort], probs[cohort]),
            "rates": honest.rates_with_ci(labels[cohort], probs[cohort], thresholds[cohort]),
        }
    site_warn = site_warning(audit)
    if site_warn:
        warnings.append(site_warn)
    return audit


def shortcut_warning(pooled: dict, looks: dict | None) -> str | None:
    """A high AUC with little Grad-CAM mass on the tumour: the signature of shortcut learning."""
    if not (looks and looks.get("pooled")):
        return None
    a = looks["pooled"]
    if pooled["auc"] >= 0.75 and a["mean_mass_in_mask"] < 1.5 * a["mean_chance"]:
        return (
            f"AUC {pooled['auc']:.2f} with {100 * a['mean_mass_in_mask']:.0f} % of the Grad-CAM mass on the tumour "
            f"(chance {100 * a['mean_chance']:.0f} %): a high AUC with little attention on the tumour is the "
            "signature of shortcut learning (scanner or site); compare the site-only baseline"
        )
    return None


PROTOCOL_LABELS = {
    "inner": "inner selection: epochs, checkpoints, thresholds and calibration chosen on a selection part of each "
    "fold's training patients; every reported patient scored once",
    "outer": "selected on the reported folds (optimistic)",
    "mixed": "mixed protocols (inner and outer folds together)",
}
BOOTSTRAP = {
    "method": "percentile interval of the AUC over stratified patient resamples (HGG and LGG patients resampled "
    "with replacement separately, so every resample keeps the grade counts)"
}
MEAN_DEFINITION = (
    "mean over the folds where the metric is defined (a fold without LGG has no specificity, balanced accuracy or "
    "AUC: left out, not counted as 0); n_folds gives how many folds each mean stands on"
)
METHODS = {
    "auc_ci": honest.AUC_CI_METHOD + "; per fold, pooled, per cohort and for the site baseline",
    "auc_bootstrap": BOOTSTRAP["method"] + " (pooled AUC only)",
    "auc_delong": honest.DELONG_METHOD + "; kept in the JSON for reference, flagged degenerate (zero width) at AUC 0 "
    "or 1 and never printed",
    "rates_ci": "Wilson score interval (Wilson 1927) for sensitivity, specificity, accuracy, PPV and NPV; balanced "
    "accuracy: a Wilson interval on the effective n with its variance",
    "ece": "expected calibration error over 10 equal-width bins of [0, 1], each |mean P(HGG) - fraction HGG| "
    "weighted by its share of the patients",
    "brier": "mean squared difference between P(HGG) and the 0/1 grade",
    "operating_point": "each patient is called HGG when P(HGG) >= its own fold's threshold (fitted on that fold's "
    "selection part, or 0.5 for runs that recorded none), in every table",
    "std": "sample standard deviation over folds (ddof = 1)",
}
POOLED_VS_FOLDS = (
    "The headline is the mean of the per-fold AUCs: each fold's model ranks the patients it held out, which is what "
    "cross-validation estimates. The pooled AUC ranks all patients together although their scores come from K "
    "different models, whose scales and thresholds differ, so it mixes model-to-model calibration into the ranking "
    "and can sit far from the per-fold figures (often below them); it is shown as a secondary check."
)


def headline(stats: dict, n_folds: dict, n_runs: int, pooled: dict) -> dict:
    """The figure the protocol supports (the mean of the per-fold AUCs with its spread) beside the pooled AUC."""
    ci = pooled.get("auc_ci") or {}
    return {
        "auc_mean_of_folds": stats["auc"][0],
        "auc_std_of_folds": stats["auc"][1],
        "auc_folds": n_folds["auc"],
        "fold_runs": n_runs,
        "auc_pooled": pooled.get("auc"),
        "auc_pooled_ci95": [ci["ci_low"], ci["ci_high"]] if "ci_low" in ci else None,
        "auc_pooled_ci_method": ci.get("method"),
        "explanation": POOLED_VS_FOLDS,
    }


def threshold_of(runs: list[FoldRun]) -> np.ndarray | float:
    """Each patient's own fold's decision threshold (fitted on that fold's selection part), in pooled order."""
    if all("threshold" not in r.final for r in runs):
        return 0.5
    return np.concatenate([np.full(len(r.ids), float(r.final.get("threshold", 0.5))) for r in runs])


def delong_or_reason(labels, probs) -> dict:
    try:
        return honest.delong_auc(labels, probs)
    except ValueError as e:
        return {"error": str(e), "n": len(labels)}


def auc_ci_or_reason(labels, probs) -> dict:
    """The reported AUC interval (Newcombe), or why there is none (a grade absent)."""
    try:
        return honest.auc_interval(labels, probs)
    except ValueError as e:
        return {"error": str(e), "n": len(labels)}


def fold_row(r: FoldRun) -> dict:
    """One fold's row, its metrics recomputed from its saved predictions at its own threshold (so that a grade the
    fold lacks reads NaN in runs written before that rule too)."""
    f = r.final
    threshold = f.get("threshold", 0.5)
    m = compute_metrics(r.labels, r.probs, threshold)
    row = {
        "repeat": r.repeat,
        "fold": r.fold,
        "run": str(r.run_dir),
        "checkpoint": f.get("checkpoint"),
        "best_epoch": f.get("best_epoch"),
        "n": len(r.ids),
        "n_hgg": int(np.sum(r.labels == 1)),
        "n_lgg": int(np.sum(r.labels == 0)),
        "threshold": threshold,
        **{k: float(m[k]) for k in METRICS},
    }
    c = auc_ci_or_reason(r.labels, r.probs)
    row["auc_ci95"] = [c["ci_low"], c["ci_high"]] if "ci_low" in c else None
    row["auc_ci_method"] = "Newcombe (2006) score, method 5" if "ci_low" in c else c.get("error")
    d = delong_or_reason(r.labels, r.probs)
    ok = "ci_low" in d and not d.get("degenerate")
    row["auc_ci95_delong"] = [d["ci_low"], d["ci_high"]] if ok else None  # reference only; null where it collapses
    row["brier"] = honest.brier(r.labels, r.probs)
    row["ece"] = honest.ece(r.labels, r.probs)
    return row


def attention_of(runs: list[FoldRun], rows: list[dict]) -> dict | None:
    """Where the model looks, from each run's newest `evaluate --attention` (evaluation_*/metrics.json): per fold,
    and pooled over the scored cases. None where no run has been checked."""
    per_fold = {}
    for r in runs:
        for ev in sorted(r.run_dir.glob("evaluation_*"), key=lambda p: p.name, reverse=True):
            try:
                found = json.loads((ev / "metrics.json").read_text())["final"].get("attention")
            except (OSError, ValueError, KeyError):
                continue
            if found:
                per_fold[r.fold] = found
                break
    if not per_fold:
        return None
    for row in rows:
        a = per_fold.get(row["fold"]) if row.get("repeat", 0) == runs[0].repeat else None
        if a:
            row.update({"attention_mass": a["mean_mass_in_mask"], "attention_chance": a["mean_chance"],
                        "pointing_game": a["pointing_game_accuracy"]})  # fmt: skip
    n = sum(a["n"] for a in per_fold.values())

    def weighted(key):
        return sum(a[key] * a["n"] for a in per_fold.values()) / n if n else math.nan

    pooled = {
        "n": n,
        "mean_mass_in_mask": weighted("mean_mass_in_mask"),
        "mean_chance": weighted("mean_chance"),
        "pointing_game_accuracy": weighted("pointing_game_accuracy"),
        "layers": sorted({a.get("layer", "?") for a in per_fold.values()}),
        "folds_checked": sorted(per_fold),
    }
    return {"per_fold": {str(k): v for k, v in per_fold.items()}, "pooled": pooled}


def site_baseline_for(runs: list[FoldRun], ids, labels, repeat: int, protocol: str) -> dict | None:
    """The site-only baseline over the same folds (folds.json of the runs' cache) and the same protocol."""
    from gliograde.data.splits import load_folds
    from gliograde.evaluation.site_baseline import site_baseline

    cache_dirs = {r.cache_dir for r in runs if r.cache_dir}
    path = next((Path(c) / "folds.json" for c in cache_dirs if (Path(c) / "folds.json").is_file()), None)
    if path is None:
        return {"error": "the runs' cache (and its folds.json) was not found; no site baseline"}
    try:
        folds = load_folds(path)
        result = site_baseline(ids, labels, folds, repeat, "inner" if protocol == "inner" else "outer")
    except GliogradeError as e:
        return {"error": str(e)}
    out = {key: result[key] for key in ("protocol", "per_fold", "pooled")}
    out["pooled"]["auc_ci"] = auc_ci_or_reason(result["labels"], result["probs"])
    try:
        out["pooled"]["auc_delong"] = honest.delong_auc(result["labels"], result["probs"])
    except ValueError as e:
        out["pooled"]["auc_delong"] = {"error": str(e)}
    out["folds_file"] = str(path)
    return out


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _mean_cell(report: dict, m: str) -> str:
    """ "mean ± std", with "(n = j of K)" where the metric is undefined in some folds."""
    cell = f"{_fmt(report['mean'][m])} ± {_fmt(report['std'][m])}"
    n, total = (report.get("n_folds") or {}).get(m), len(report["folds"])
    return cell + (f" (n = {n} of {total})" if n is not None and n < total else "")


def table_lines(report: dict) -> list[str]:
    """The per-fold markdown table with its mean ± std row (printed by the CLI too)."""
    many = len({r.get("repeat", 0) for r in report["folds"]}) > 1
    head = ["Repeat"] * many + ["Fold", "Best epoch", "Checkpoint", "HGG/LGG", "Threshold", "AUC"]
    head += ["AUC 95 % CI (Newcombe)", "F1", "Accuracy", "Sensitivity", "Specificity", "Bal. acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["folds"]:
        ci = r.get("auc_ci95")
        cells = [str(r.get("repeat", 0))] * many + [str(r["fold"]), str(r["best_epoch"]), str(r["checkpoint"])]
        cells += [f"{r.get('n_hgg', '?')}/{r.get('n_lgg', '?')}", _fmt(r.get("threshold", 0.5)), _fmt(r["auc"])]
        cells += [f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci else "n/a"]
        cells += [_fmt(r[m]) for m in METRICS if m != "auc"]
        lines.append("| " + " | ".join(cells) + " |")
    ms = {m: _mean_cell(report, m) for m in METRICS}
    name = "**Mean ± std**" + (" (PARTIAL)" if report["partial"] else "")
    cells = [name] + [""] * (many + 4) + [ms["auc"], ""] + [ms[m] for m in METRICS if m != "auc"]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def honest_lines(p: dict) -> list[str]:
    lines = []
    d = p.get("auc_delong", {})
    if "ci_low" in d and not d.get("degenerate"):
        lines.append(f"- DeLong SE of the AUC {_fmt(d['se'])} (its logit-scale 95 % CI "
                     f"{_fmt(d['ci_low'])}-{_fmt(d['ci_high'])}, for reference)")  # fmt: skip
    r = p["rates"]
    cells = [
        f"{name} {_fmt(r[key]['value'])} ({_fmt(r[key]['ci_low'])}-{_fmt(r[key]['ci_high'])})"
        for name, key in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("balanced accuracy",
                          "balanced_accuracy"))
    ]  # fmt: skip
    where = "threshold 0.5" if r["threshold"] == 0.5 else "each fold's own threshold"
    lines.append(f"- at {where}, with 95 % Wilson CIs: " + ", ".join(cells))
    c = p["calibration"]
    lines.append(f"- calibration: Brier {_fmt(c['brier'])}, ECE {_fmt(c['ece'])} ({c['n_bins']} equal-width bins)")
    sas = p.get("sensitivity_at_specificity")
    if sas:
        parts = [f"{_fmt(sas[k]['sensitivity'])} at specificity ≥ {k}" for k in ("0.90", "0.95")]
        lines.append(f"- sensitivity {', '.join(parts)} ({sas['protocol']})")
    return lines


def _ci(d: dict, lead: str, tail: str = "") -> str:
    """ "lead LOW-HIGH tail" of an interval record, or nothing where it could not be computed."""
    return f"{lead}{_fmt(d['ci_low'])}-{_fmt(d['ci_high'])}{tail}" if "ci_low" in d else ""


def headline_lines(report: dict) -> list[str]:
    """The headline (mean of per-fold AUCs ± SD) beside the pooled AUC, with the sentence that tells them apart."""
    h = report.get("headline")
    if not h:
        return []
    n, runs = h["auc_folds"], h.get("fold_runs", h["auc_folds"])
    of = f"{n} of {runs} folds; the others lack a grade" if n < runs else f"{n} fold{'s' * (n != 1)}"
    ci = h.get("auc_pooled_ci95")
    pooled_ci = f" (95 % CI {_fmt(ci[0])}-{_fmt(ci[1])}, Newcombe)" if ci else ""
    return [
        "## Headline",
        "",
        "| | AUC |",
        "|---|---|",
        f"| **Mean of the per-fold AUCs** ± SD ({of}) | **{_fmt(h['auc_mean_of_folds'])} ± "
        f"{_fmt(h['auc_std_of_folds'])}** |",
        f"| Pooled out-of-fold AUC (all patients ranked together) | {_fmt(h['auc_pooled'])}{pooled_ci} |",
        "",
        h["explanation"],
        "",
    ]


def _write(out: Path, report: dict) -> None:
    p = report["pooled"]
    lo, hi = p["auc_ci95"]
    title = f"# Cross-validation summary: {report['k']}-fold" + (" (PARTIAL)" if report["partial"] else "")
    md = [title, ""]
    md += [f"> **Warning.** {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    md += [f"**Protocol.** {report.get('protocol_label', 'not recorded')}.", ""]
    md += headline_lines(report)
    md += ["## Per fold", "", *table_lines(report), "", f"Std: {report['std_definition']}."]
    md += [f"Mean: {report.get('mean_definition', 'mean over folds')}.", ""]
    rep = report.get("over_repeats")
    if rep and rep["n_repeats"] > 1:
        md += [
            "## Repeats",
            "",
            "| Repeat | Pooled AUC | 95 % CI (Newcombe) |",
            "|---|---|---|",
            *(
                f"| {r['repeat']} | {_fmt(r['pooled']['auc'])} | "
                f"{_fmt(r['pooled']['auc_ci'].get('ci_low'))}-{_fmt(r['pooled']['auc_ci'].get('ci_high'))} |"
                for r in report["repeats"]
            ),
            "",
            f"Pooled AUC over {rep['n_repeats']} repeats: mean {_fmt(rep['mean'])} ± {_fmt(rep['std'])} (sample std), "
            f"range {_fmt(rep['min'])}-{_fmt(rep['max'])}. The sections below are repeat 0's.",
            "",
        ]
    md += [
        "## Pooled out-of-fold",
        "",
        f"Each of the {p['n']} patients predicted once, by the fold that held it out. Secondary to the headline: "
        "these scores come from different models.",
        "",
        f"- AUC {_fmt(p['auc'])}{_ci(p.get('auc_ci', {}), ' (95 % CI ', ', Newcombe score method 5;')} "
        f"95 % bootstrap CI {_fmt(lo)}-{_fmt(hi)}, {p['bootstrap']['resamples']} stratified patient resamples, seed "
        f"{p['bootstrap']['seed']})",
        f"- F1 {_fmt(p['f1'])}, accuracy {_fmt(p['accuracy'])}, balanced accuracy {_fmt(p['balanced_accuracy'])}",
        f"- sensitivity (HGG) {_fmt(p['sensitivity'])}, specificity (LGG) {_fmt(p['specificity'])}",
        f"- confusion matrix (rows true {GRADES[0]}/{GRADES[1]}, columns predicted): {p['confusion_matrix']}",
        *honest_lines(p),
        "",
        "## Sites",
        "",
        "| Site | Cases | HGG | LGG | Single grade | Accuracy |",
        "|---|---|---|---|---|---|",
    ]
    audit = report["sites"]
    for site, e in audit["sites"].items():
        single = "n/a" if e["single_grade"] is None else "yes" if e["single_grade"] else "no"
        name = f"{site} (ids naming no site; not one site)" if site == UNKNOWN_SITE else site
        md.append(f"| {name} | {e['cases']} | {e['HGG']} | {e['LGG']} | {single} | {_fmt(e.get('accuracy'))} |")
    md += ["", "Accuracy at each patient's own fold's threshold."]
    base = report.get("site_baseline") or {}
    if "pooled" in base:
        b = base["pooled"]
        ci = _ci(b.get("auc_ci", {}), " (95 % CI ", ", Newcombe)")
        md += [
            "",
            f"**Site-only baseline** (logistic regression on the site read from the case id, same folds, protocol "
            f"{base['protocol']}): pooled AUC {_fmt(b['auc'])}{ci}, against the model's {_fmt(p['auc'])}. What the "
            "site alone predicts is not evidence that the images were read.",
        ]
    elif base.get("error"):
        md += ["", f"Site-only baseline not computed: {base['error']}."]
    looks = report.get("attention") or {}
    if looks.get("pooled"):
        a = looks["pooled"]
        md += [
            "",
            f"**Where the model looks** (Grad-CAM at {', '.join(a['layers'])} against the tumour masks, folds "
            f"{a['folds_checked']}, {a['n']} cases): {100 * a['mean_mass_in_mask']:.1f} % of the map's mass inside "
            f"the tumour (a map uniform over the brain: {100 * a['mean_chance']:.1f} %), pointing game "
            f"{a['pointing_game_accuracy']:.2f}.",
        ]
    if "mixed_cohort" in audit:
        c = audit["mixed_cohort"]
        ci = _ci(c.get("auc_ci", {}), ", 95 % CI ", " (Newcombe)")
        md += [
            "",
            f"Mixed-grade {c['site']} cohort alone (n = {c['n']}: {c['per_class']['HGG']['support']} HGG, "
            f"{c['per_class']['LGG']['support']} LGG): AUC {_fmt(c['auc'])}{ci}, "
            f"accuracy {_fmt(c['accuracy'])}, sensitivity {_fmt(c['sensitivity'])}, "
            f"specificity {_fmt(c['specificity'])}, at each patient's own fold's threshold (as in the site table).",
        ]
    md += ["", "## Figures", "", *(f"- {Path(f).name}" for f in report["figures"]), ""]
    md += ["## Runs", "", *(f"- fold {r['fold']}: {r['run']}" for r in report["folds"]), ""]

    write_text_atomic(out / "summary.md", "\n".join(md))
    write_json(out / "summary.json", json_safe(report))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fold", "best_epoch", "checkpoint", *METRICS, "run", "repeat", "threshold"])
    for r in report["folds"]:
        w.writerow(
            [r["fold"], r["best_epoch"], r["checkpoint"], *(r[m] for m in METRICS), r["run"], r.get("repeat", 0),
             r.get("threshold", 0.5)]
        )  # fmt: skip
    w.writerow(["mean", "", "", *(report["mean"][m] for m in METRICS), "", "", ""])
    w.writerow(["std", "", "", *(report["std"][m] for m in METRICS), "", "", ""])
    write_text_atomic(out / "summary.csv", buf.getvalue())
