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
from gliograde.data.brats import UNKNOWN_SITE
from gliograde.errors import GliogradeError
from gliograde.evaluation import stats
from gliograde.evaluation.metrics import compute_metrics, summarized, summarized_names
from gliograde.evaluation.plots import readable_legend, save_figure
from gliograde.evaluation.site_baseline import MIXED_COHORT, site_audit, site_lookup, site_warning
from gliograde.files import json_safe, number, write_json, write_text_atomic
from gliograde.runs import (
    FoldRun,
    SummaryError,
    config_differences,
    find_runs,
    fold_row,
    label,
    model_line,
    read_run,
    runs_model,
    shared,
    threshold_of,
    who_holds,
)
from gliograde.templates import class_words, dashed, fixed, md_table, relabel, render, yes_no

log = logging.getLogger("gliograde")


# ------------------------------------------------------------------------------------------------------ figures
def cv_curves(runs: list[FoldRun], pooled_labels, pooled_probs, out_dir: Path, positive="HGG") -> tuple[Path, Path]:
    """cv_roc_curves.png and cv_pr_curves.png: per fold, mean ± 1 std over folds (interpolated), pooled."""
    paths = (out_dir / "cv_roc_curves.png", out_dir / "cv_pr_curves.png")
    for kind, path in zip(("roc", "pr"), paths, strict=True):
        save_figure(cv_figure(kind, runs, pooled_labels, pooled_probs, positive), path, dpi=110)
    return paths


def cv_figure(kind: str, runs: list[FoldRun], pooled_labels, pooled_probs, positive: str = "HGG") -> Figure:
    """One of the CV figures ("roc" or "pr"), its legend at the readable size of plots.LEGEND_FONTSIZE."""
    grid = np.linspace(0, 1, 201)
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
        ax.set(xlabel="1 - specificity", ylabel=f"sensitivity ({positive})", title="ROC, cross-validation")
    else:
        ax.axhline(np.mean(pooled_labels), color="grey", ls=":", label=f"prevalence of {positive}")
        ax.set(xlabel=f"recall ({positive})", ylabel=f"precision ({positive})",
               title="precision-recall, cross-validation")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    return readable_legend(fig, loc="lower right" if kind == "roc" else "lower left")


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
    spread = {m: stats.mean_std([row[m] for row in rows]) for m in summarized_names()}
    per_repeat = [pool_repeat(ordered, rep, bootstrap, seed) for rep in repeats]
    first = per_repeat[0]
    pooled, labels, probs, all_ids = first["pooled"], first["labels"], first["probs"], first["ids"]
    classes, sites = ordered[0].classes, cohort_sites(ordered)
    audit = audit_sites(first_repeat, all_ids, labels, probs, warnings, sites, classes)
    baseline = site_baseline_for(ordered, all_ids, labels, repeats[0], protocol, sites)
    looks = attention_of(first_repeat, rows)
    shortcut = shortcut_warning(pooled, looks)
    if shortcut:
        warnings.append(shortcut)

    n_folds = {m: stats.defined([row[m] for row in rows]) for m in summarized_names()}
    report = {
        "results_dir": str(results_dir),
        "model": runs_model([r.run_dir for r in ordered]),
        "classes": list(classes),
        "k": k,
        "protocol": protocol,
        "protocol_label": PROTOCOL_LABELS.get(protocol, protocol),
        "partial": bool(missing),
        "missing_folds": [f for rep, f in missing if rep == repeats[0]],
        "missing": [list(m) for m in missing],
        "headline": headline(spread, n_folds, len(rows), pooled),
        "folds": rows,
        "mean": {m: s[0] for m, s in spread.items()},
        "std": {m: s[1] for m, s in spread.items()},
        "n_folds": n_folds,
        "std_definition": "sample standard deviation over folds (ddof = 1)",
        "mean_definition": relabel(MEAN_DEFINITION, classes),
        "methods": relabel(METHODS, classes),
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
    roc_png, pr_png = cv_curves(first_repeat, labels, probs, results_dir, classes[1])
    rel_png = results_dir / "cv_reliability.png"
    save_figure(stats.reliability_figure(reliability_curves(per_repeat)), rel_png)
    report["figures"] = [str(roc_png), str(pr_png), str(rel_png)]
    report["report_html"] = str(results_dir / "report.html")
    _write(results_dir, report)
    from gliograde.evaluation.report import write_report

    write_report(report, results_dir, report["provenance"]["shared"], report["configuration"])
    return report


def reliability_curves(per_repeat: list[dict]) -> dict:
    """The pooled reliability curve of each repeat, by legend label: "all folds" for a single repeat."""
    if len(per_repeat) == 1:
        return {"all folds (pooled)": per_repeat[0]["pooled"]["calibration"]["reliability"]}
    return {f"repeat {r['repeat']}": r["pooled"]["calibration"]["reliability"] for r in per_repeat}


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
    pooled = compute_metrics(labels, probs, threshold_of(rruns), rruns[0].classes)
    boot = stats.bootstrap_auc(labels, probs, bootstrap, seed)
    pooled.update(
        {
            "auc_ci95": [boot["ci_low"], boot["ci_high"]],
            "bootstrap": {"resamples": bootstrap, "seed": seed, **BOOTSTRAP},
        }
    )
    pooled.update(stats.honest_statistics(labels, probs, threshold_of(rruns)))
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


def audit_sites(first_repeat: list[FoldRun], all_ids, labels, probs, warnings: list[str], sites=None,
                classes=GRADES) -> dict:  # fmt: skip
    """The site audit and the mixed-grade 2013 cohort, at one operating point everywhere: each patient at its own
    fold's threshold. A warning joins `warnings` where single-grade sites could carry the AUC. `sites`: id -> site
    of the runs' cohort (None: the site each BraTS id names)."""
    thresholds = np.broadcast_to(threshold_of(first_repeat), probs.shape)
    preds = (probs >= thresholds).astype(np.int64)
    audit = site_audit(all_ids, labels, preds, sites, classes)
    site_of_id = site_lookup(sites)
    cohort = [k_ for k_, i in enumerate(all_ids) if site_of_id(i) == MIXED_COHORT]
    if cohort and classes == GRADES:  # the BraTS 2013 cohort: the mixed-grade site of the seeds' data
        audit["mixed_cohort"] = {
            "site": MIXED_COHORT,
            **compute_metrics(labels[cohort], probs[cohort], thresholds[cohort]),
            "threshold": "each patient's own fold's threshold (as in the site table)",
            "auc_ci": stats.auc_ci_or_reason(labels[cohort], probs[cohort]),
            "auc_delong": stats.delong_or_reason(labels[cohort], probs[cohort]),
            "rates": stats.rates_with_ci(labels[cohort], probs[cohort], thresholds[cohort]),
        }
    site_warn = site_warning(audit, class_words(classes)["what"])
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
    "auc_ci": stats.AUC_CI_METHOD + "; per fold, pooled, per cohort and for the site baseline",
    "auc_bootstrap": BOOTSTRAP["method"] + " (pooled AUC only)",
    "auc_delong": stats.DELONG_METHOD + "; kept in the JSON for reference, flagged degenerate (zero width) at AUC 0 "
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


def headline(spread: dict, n_folds: dict, n_runs: int, pooled: dict) -> dict:
    """The figure the protocol supports (the mean of the per-fold AUCs with its spread) beside the pooled AUC."""
    ci = pooled.get("auc_ci") or {}
    return {
        "auc_mean_of_folds": spread["auc"][0],
        "auc_std_of_folds": spread["auc"][1],
        "auc_folds": n_folds["auc"],
        "fold_runs": n_runs,
        "auc_pooled": pooled.get("auc"),
        "auc_pooled_ci95": [ci["ci_low"], ci["ci_high"]] if "ci_low" in ci else None,
        "auc_pooled_ci_method": ci.get("method"),
        "explanation": POOLED_VS_FOLDS,
    }


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
            if found:  # an undefined figure is null in the file (NaN in files written before): NaN here
                figures = ("mean_mass_in_mask", "mean_chance", "pointing_game_accuracy")
                per_fold[r.fold] = {**found, **{k: number(found.get(k)) for k in figures}}
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


def cohort_sites(runs: list[FoldRun]) -> dict[str, str] | None:
    """id -> site as the runs' cache holds it (a cohort table's site column, a BraTS 2020 mapping's, or the BraTS
    id's); None where no cache of theirs can be opened (the sites the ids name are used then)."""
    from gliograde.data.cache import open_cache

    for path in sorted({r.cache_dir for r in runs if r.cache_dir}):
        try:
            return {c.id: c.site for c in open_cache(path).cases}
        except GliogradeError:
            continue
    return None


def site_baseline_for(runs: list[FoldRun], ids, labels, repeat: int, protocol: str, sites=None) -> dict | None:
    """The site-only baseline over the same folds (folds.json of the runs' cache) and the same protocol."""
    from gliograde.data.splits import load_folds
    from gliograde.evaluation.site_baseline import site_baseline

    cache_dirs = {r.cache_dir for r in runs if r.cache_dir}
    path = next((Path(c) / "folds.json" for c in cache_dirs if (Path(c) / "folds.json").is_file()), None)
    if path is None:
        return {"error": "the runs' cache (and its folds.json) was not found; no site baseline"}
    try:
        folds = load_folds(path)
        result = site_baseline(ids, labels, folds, repeat, "inner" if protocol == "inner" else "outer", sites)
    except GliogradeError as e:
        return {"error": str(e)}
    out = {key: result[key] for key in ("protocol", "per_fold", "pooled")}
    out["pooled"]["auc_ci"] = stats.auc_ci_or_reason(result["labels"], result["probs"])
    try:
        out["pooled"]["auc_delong"] = stats.delong_auc(result["labels"], result["probs"])
    except ValueError as e:
        out["pooled"]["auc_delong"] = {"error": str(e)}
    out["folds_file"] = str(path)
    return out


# ------------------------------------------------------------------------------------------------------ summary.md
# the Wilson intervals of the pooled rates that summary.md lists: (key of pooled["rates"], name)
WILSON = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("balanced_accuracy", "balanced accuracy"))


def _mean_cell(report: dict, m: str) -> str:
    """ "mean ± std", with "(n = j of K)" where the metric is undefined in some folds."""
    cell = f"{fixed(report['mean'].get(m))} ± {fixed(report['std'].get(m))}"
    n, total = (report.get("n_folds") or {}).get(m), len(report["folds"])
    return cell + (f" (n = {n} of {total})" if n is not None and n < total else "")


def fold_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The per-fold table with its mean ± std row, as (header, rows) of Markdown cells."""
    many = len({r.get("repeat", 0) for r in report["folds"]}) > 1
    others = [spec for spec in summarized() if spec.name != "auc"]  # the metrics table's order and labels
    neg, pos = report.get("classes") or GRADES
    head = ["Repeat"] * many + ["Fold", "Best epoch", "Checkpoint", f"{pos}/{neg}", "Threshold", "AUC"]
    head += ["AUC 95 % CI (Newcombe)", *(spec.label for spec in others)]
    rows = []
    for r in report["folds"]:
        ci = r.get("auc_ci95")
        cells = [str(r.get("repeat", 0))] * many + [str(r["fold"]), str(r["best_epoch"]), str(r["checkpoint"])]
        cells += [f"{r.get('n_hgg', '?')}/{r.get('n_lgg', '?')}", fixed(r.get("threshold", 0.5)), fixed(r["auc"])]
        cells += [dashed(ci) if ci else "n/a"]
        cells += [spec.format(r.get(spec.name)) for spec in others]
        rows.append(cells)
    name = "**Mean ± std**" + (" (PARTIAL)" if report["partial"] else "")
    means = [_mean_cell(report, spec.name) for spec in others]
    rows.append([name] + [""] * (many + 4) + [_mean_cell(report, "auc"), "", *means])
    return head, rows


def table_lines(report: dict) -> list[str]:
    """The per-fold Markdown table with its mean ± std row (printed by the CLI too)."""
    return md_table(*fold_table(report))


def headline_rows(report: dict) -> list[list[str]]:
    """The headline (mean of per-fold AUCs ± SD) beside the pooled AUC; none in an older summary."""
    h = report.get("headline")
    if not h:
        return []
    n, runs = h["auc_folds"], h.get("fold_runs", h["auc_folds"])
    of = f"{n} of {runs} folds; the others lack a grade" if n < runs else f"{n} fold{'s' * (n != 1)}"
    ci = h.get("auc_pooled_ci95")
    pooled_ci = f" (95 % CI {dashed(ci)}, Newcombe)" if ci else ""
    return [
        [f"**Mean of the per-fold AUCs** ± SD ({of})",
         f"**{fixed(h['auc_mean_of_folds'])} ± {fixed(h['auc_std_of_folds'])}**"],
        ["Pooled out-of-fold AUC (all patients ranked together)", f"{fixed(h['auc_pooled'])}{pooled_ci}"],
    ]  # fmt: skip


def repeat_rows(report: dict) -> list[list[str]] | None:
    """The pooled AUC of each repeat; None (no section) for a single repeat."""
    rep = report.get("over_repeats")
    if not (rep and rep["n_repeats"] > 1):
        return None
    rows = []
    for r in report["repeats"]:
        pooled, ci = r["pooled"], r["pooled"]["auc_ci"]
        rows.append([str(r["repeat"]), fixed(pooled["auc"]), f"{fixed(ci.get('ci_low'))}-{fixed(ci.get('ci_high'))}"])
    return rows


def site_rows(audit: dict, classes=GRADES) -> list[list[str]]:
    neg, pos = classes
    rows = []
    for site, e in audit["sites"].items():
        name = f"{site} (ids naming no site; not one site)" if site == UNKNOWN_SITE else site
        rows.append([name, e["cases"], e.get(pos), e.get(neg), yes_no(e["single_grade"]), fixed(e.get("accuracy"))])
    return rows


# the training configuration values summary.md lists (all of them are in summary.json and report.html)
KEY_CONFIGURATION = (
    ("pretrained_path", "pretrained weights"),
    ("epochs", "epochs (at most)"),
    ("batch", None),
    ("optimizer", "optimizer"),
    ("lr", "learning rate (backbone)"),
    ("classifier_lr_mult", "classifier learning rate multiplier"),
    ("weight_decay", "weight decay"),
    ("scheduler", "scheduler"),
    ("warmup_epochs", "warm-up epochs"),
    ("loss", "loss"),
    ("sampler", "sampler"),
    ("dropout", "dropout"),
    ("augment", "augmentation"),
    ("ema_decay", "EMA decay (0 = off)"),
    ("patience", "early-stopping patience"),
    ("min_epochs", "minimum epochs"),
    ("selection", "selection protocol"),
    ("seed", "seed"),
)


def configuration_rows(config: dict, model: dict) -> list[list]:
    """summary.md's configuration table: the network and the key training values the folds share."""
    rows = [["network and input", model_line(model)]]
    for key, name in KEY_CONFIGURATION:
        if key == "batch" and "batch_size" in config:
            rows.append(["batch", f"{config['batch_size']} x {config.get('grad_accum', 1)} (gradient accumulation)"])
        elif key in config:
            rows.append([name, "none" if config[key] is None else config[key]])
    if len(rows) == 1:
        rows.append(["training values", "not recorded, or not shared by all folds (see summary.json)"])
    return rows


def summary_markdown(report: dict) -> str:
    """summary.md (templates/summary.md.j2) of a summary record."""
    return render(
        "summary.md.j2",
        r=report,
        model=model_line(report.get("model") or {}),
        headline=headline_rows(report),
        folds=fold_table(report),
        repeats=repeat_rows(report),
        wilson=WILSON,
        sites=site_rows(report["sites"], tuple(report.get("classes") or GRADES)),
        configuration=configuration_rows(report.get("configuration") or {}, report.get("model") or {}),
        grades=GRADES,
        classes=report.get("classes"),
        figures=[Path(f).name for f in report["figures"]],
        runs=[f"fold {r['fold']}: {r['run']}" for r in report["folds"]],
    )


def _write(out: Path, report: dict) -> None:
    write_text_atomic(out / "summary.md", summary_markdown(report))
    write_json(out / "summary.json", json_safe(report))
    buf = io.StringIO()
    w = csv.writer(buf)
    names = summarized_names()
    w.writerow(["fold", "best_epoch", "checkpoint", *names, "run", "repeat", "threshold"])
    for r in report["folds"]:
        w.writerow(
            [r["fold"], r["best_epoch"], r["checkpoint"], *(r.get(m) for m in names), r["run"], r.get("repeat", 0),
             r.get("threshold", 0.5)]
        )  # fmt: skip
    w.writerow(["mean", "", "", *(report["mean"][m] for m in names), "", "", ""])
    w.writerow(["std", "", "", *(report["std"][m] for m in names), "", "", ""])
    write_text_atomic(out / "summary.csv", buf.getvalue())
