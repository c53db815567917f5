"""`gliograde compare RESULTS_A RESULTS_B [...]`: is B better than A, on the same patients?

Two cross-validation results folders trained on the same split hold out the same patients in the same folds, so
each patient has one out-of-fold prediction from A and one from B. Comparing the two pooled AUCs as if they came
from independent samples (two overlapping confidence intervals, an unpaired test) throws that pairing away: most of
the noise in an AUC is which patients were drawn, and that noise is shared by A and B. Every test here is paired:

- **Paired DeLong test** (DeLong, DeLong & Clarke-Pearson 1988): the AUC difference and its standard error from the
  covariance of the two AUCs' structural components over the same patients; a normal 95 % CI and two-sided p.
- **Paired stratified bootstrap**: the same resampled patients (positives and negatives resampled separately) score
  both A and B; the percentile interval of B - A and a two-sided bootstrap p. A check on DeLong's normal
  approximation, seeded.
- **Exact McNemar test** on the decisions: each patient is called HGG or LGG by each run at that run's own decision
  threshold (`final["threshold"]`, 0.5 for runs that recorded none); ``b`` = patients A gets right and B wrong,
  ``c`` = A wrong and B right; the binomial test on the discordant pairs.
- **Corrected resampled t-test** (Nadeau & Bengio 2003) over the per-(repeat, fold) AUC differences, when both
  folders hold two or more repeats of the CV: the folds' training sets overlap, so the naive t-test's variance is
  too small; the correction inflates it by ``n_test / n_train``. df = J - 1 for J (repeat, fold) pairs. n_train is
  the number of patients the networks were fitted on, ``final.selection.n_fit`` of the runs (with inner selection
  the fit part, ~182 of 228 outer-training patients in BraTS 2018), not the outer training size; runs that record
  no n_fit fall back to the outer training size, said so in ``n_train_source``.

Before any test, the pairing is checked, not assumed: both folders must hold the same patients in each compared
repeat, each patient in the same fold on both sides, with the same label, and the recorded split settings (K, split
seed, grouping, leave-site-out, inner part) must agree where both record them. Otherwise a `CompareError` says why.

Runs selected on the reported folds (`--selection outer`, the seeds' protocol and the default of runs that recorded
no protocol) give optimistic numbers on both sides; the report warns, and warns when the two sides' protocols differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from gliograde.config import RUNTIME_FIELDS, TrainConfig
from gliograde.errors import GliogradeError
from gliograde.evaluation import stats
from gliograde.evaluation.plots import save_figure
from gliograde.files import json_safe, new_stamped_dir, write_json, write_text_atomic
from gliograde.runs import FoldRun, SummaryError, find_runs
from gliograde.templates import fixed, pvalue, render

SPLIT_FIELDS = ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction")
# settings that decide which patient lands in which fold; "repeats" only says how many repeats there are, and
# "inner_fraction" splits each fold's training patients, not the held-out ones (noted when they differ)
FOLD_DEFINING = ("split_seed", "group_by", "leave_site_out")
GRADE = {0: "LGG", 1: "HGG"}
# the configuration a comparison names where the two sides differ: what decides what a run computes (not how it was
# run: RUNTIME_FIELDS), less the split and the protocol (checked and shown on their own) and the fold
NOT_SETTINGS = {*RUNTIME_FIELDS, *SPLIT_FIELDS, "fold", "repeat", "selection"}
# readable names of the settings a comparison across backbones and fine-tuning policies turns on; any other field is
# named by its flag
SETTING_NAMES = {
    "model": "network (--model)",
    "depth": "depth (--depth)",
    "pretrained_path": "pretrained weights (--pretrained-path)",
    "probe": "linear probing: backbone frozen (--probe)",
    "freeze_epochs": "backbone frozen for the first epochs (--freeze-epochs)",
    "layer_decay": "layer-wise learning-rate decay (--layer-decay)",
    "lr": "backbone learning rate (--lr)",
    "classifier_lr_mult": "head learning rate / backbone's (--classifier-lr-mult)",
    "modalities": "modalities (--modality)",
    "loss": "loss (--loss)",
}
ALPHA = 0.05


class CompareError(GliogradeError):
    pass


@dataclass
class Side:
    """One results folder: its newest complete run of each (repeat, fold), and what its runs do not record."""

    path: Path
    name: str
    runs: dict[int, dict[int, FoldRun]]  # repeat -> fold -> run
    k: int
    split: dict  # split setting -> value (None: not recorded)
    protocol: str
    missing: list[str] = field(default_factory=list)
    problems: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # configuration key -> value (MIXED where its folds differ)


def _where(repeat: int, fold: int) -> str:
    return f"fold {fold}" if repeat == 0 else f"repeat {repeat} fold {fold}"


def _threshold(run: FoldRun) -> float:
    t = run.final.get("threshold") if isinstance(run.final, dict) else None
    return 0.5 if t is None else float(t)


def load_side(path: str | Path, name: str) -> Side:
    path = Path(path)
    try:
        chosen, problems = find_runs(path)
    except SummaryError as e:
        raise CompareError(f"{name} ({path}): {e}") from None
    if not chosen:
        detail = "; ".join(f"{_where(*key)}: {why}" for key, why in sorted(problems.items()))
        raise CompareError(f"no finished fold in {path}" + (f" ({detail})" if detail else ""))
    ks = sorted({r.folds for r in chosen.values()})
    if len(ks) > 1:
        raise CompareError(f"the runs in {path} were trained with different numbers of folds {ks}: not one CV")
    configs = [_config(r) for r in chosen.values()]
    split, unknown = {}, []
    for key in SPLIT_FIELDS[1:]:
        recorded = {json.dumps(c[key], sort_keys=True) for c in configs if key in c}
        if len(recorded) > 1:
            values = ", ".join(sorted(recorded))
            raise CompareError(f"the runs in {path} come from different splits ({key}: {values})")
        if recorded:
            split[key] = json.loads(recorded.pop())
        if any(key not in c for c in configs):
            unknown.append(key)
    split["folds"] = ks[0]
    protocols = sorted({r.protocol for r in chosen.values()})
    missing = []
    if any(r.final.get("threshold") is None for r in chosen.values()):
        missing.append("threshold (0.5 assumed)")
    if not all(_records_protocol(r) for r in chosen.values()):
        missing.append("selection protocol (outer assumed)")
    if unknown:
        missing.append(f"split settings {', '.join(unknown)} (fold membership checked patient by patient)")
    if any(not r.final.get("checkpoint") for r in chosen.values()):
        missing.append("checkpoint name")
    runs: dict[int, dict[int, FoldRun]] = {}
    for (rep, fold), run in sorted(chosen.items()):
        runs.setdefault(rep, {})[fold] = run
    return Side(
        path,
        name,
        runs,
        ks[0],
        split,
        protocols[0] if len(protocols) == 1 else "mixed",
        missing,
        {f"{_where(*key)}": why for key, why in sorted(problems.items())},
        _settings(configs),
    )


MIXED = "(differs between its folds)"


def _settings(configs: list[dict]) -> dict:
    """A results folder's configuration, setting by setting: the value its runs recorded (a run made before a setting
    existed ran without it: its default), MIXED where its folds differ."""
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    out = {}
    for key, default in defaults.items():
        if key not in NOT_SETTINGS:
            values = {json.dumps(c.get(key, default), sort_keys=True) for c in configs}
            out[key] = json.loads(values.pop()) if len(values) == 1 else MIXED
    return out


def setting_name(key: str) -> str:
    """How compare names a configuration setting: its readable name, else its flag, else its key."""
    if key in SETTING_NAMES:
        return SETTING_NAMES[key]
    f = TrainConfig.__dataclass_fields__.get(key)
    if f is None or "group" not in f.metadata:
        return key
    return (f.metadata.get("flags") or [f"--{key.replace('_', '-')}"])[0]


def setting_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_differences(a: Side, b: Side) -> list[dict]:
    """The configuration settings in which B differs from A (or either side's folds differ among themselves)."""
    return [
        {"key": k, "setting": setting_name(k), "a": a.settings[k], "b": b.settings[k]}
        for k in a.settings
        if k in b.settings and (a.settings[k] != b.settings[k] or MIXED in (a.settings[k], b.settings[k]))
    ]


def _config(run: FoldRun) -> dict:
    """The run's configuration as recorded (an old run's config.json may lack the split settings)."""
    try:
        return json.loads((run.run_dir / "config" / "config.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _records_protocol(run: FoldRun) -> bool:
    try:
        metrics = json.loads((run.run_dir / "metrics" / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return bool((metrics.get("selection") or (metrics.get("final") or {}).get("selection") or {}).get("protocol"))


# ------------------------------------------------------------------------------------------------------ pairing
def _check_splits(a: Side, b: Side) -> list[str]:
    if a.k != b.k:
        raise CompareError(
            f"K differs: {a.name} ({a.path}) was trained with K = {a.k} folds, {b.name} ({b.path}) with K = {b.k}: "
            "not the same folds"
        )
    notes = []
    for key in FOLD_DEFINING:
        if key in a.split and key in b.split and a.split[key] != b.split[key]:
            va, vb = a.split[key], b.split[key]
            raise CompareError(
                f"split setting {key} differs: {a.name} ({a.path}) has {key} = {va!r}, {b.name} ({b.path}) has "
                f"{key} = {vb!r}: not the same folds"
            )
    va, vb = a.split.get("repeats"), b.split.get("repeats")
    if "repeats" in a.split and "repeats" in b.split and va != vb:
        notes.append(f"{a.name} was run with {va} repeat(s), {b.name} with {vb}; the repeats both hold are compared")
    va, vb = a.split.get("inner_fraction"), b.split.get("inner_fraction")
    if "inner_fraction" in a.split and "inner_fraction" in b.split and va != vb:
        notes.append(
            f"inner selection part differs ({a.name}: {va}, {b.name}: {vb}): the held-out folds are the same, the "
            "models were selected on different parts of their training patients"
        )
    return notes


def _patients(side: Side, repeat: int) -> dict[str, tuple[int, int, float, float]]:
    """id -> (fold, label, P(HGG), the fold's threshold) over the repeat's folds."""
    out = {}
    for fold, run in sorted(side.runs[repeat].items()):
        thr = _threshold(run)
        for pid, y, p in zip(run.ids, run.labels, run.probs, strict=True):
            if pid in out:
                raise CompareError(
                    f"{side.name} ({side.path}) validates patient {pid} in {_where(repeat, out[pid][0])} and "
                    f"{_where(repeat, fold)}: its runs used different splits"
                )
            out[pid] = (fold, int(y), float(p), thr)
    return out


def pair_repeat(a: Side, b: Side, repeat: int) -> dict:
    """The patients of one repeat, matched by id: arrays in A's (fold, id) order, each patient's fold, thresholds."""
    pa, pb = _patients(a, repeat), _patients(b, repeat)
    if set(pa) != set(pb):
        only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
        folds_a, folds_b = set(a.runs[repeat]), set(b.runs[repeat])
        detail = []
        if folds_a - folds_b:
            detail.append(f"{b.name} has no finished {', '.join(_where(repeat, f) for f in sorted(folds_a - folds_b))}")
        if folds_b - folds_a:
            detail.append(f"{a.name} has no finished {', '.join(_where(repeat, f) for f in sorted(folds_b - folds_a))}")
        raise CompareError(
            f"{a.name} ({a.path}) and {b.name} ({b.path}) hold out different patient sets"
            + (f" in repeat {repeat}" if repeat else "")
            + f": {len(only_a)} only in {a.name} ({', '.join(only_a[:3])}{'...' if len(only_a) > 3 else ''}), "
            f"{len(only_b)} only in {b.name} ({', '.join(only_b[:3])}{'...' if len(only_b) > 3 else ''})"
            + (f"; {'; '.join(detail)}" if detail else "")
        )
    for fold in sorted(a.runs[repeat]):
        moved = [pid for pid, v in pa.items() if v[0] == fold and pb[pid][0] != fold]
        if moved:
            raise CompareError(
                f"{_where(repeat, fold)} of {a.name} ({a.path}) validates {len(moved)} patients that {b.name} "
                f"({b.path}) validates in other folds (e.g. {moved[0]} in {_where(repeat, pb[moved[0]][0])}): "
                "not the same folds"
            )
    for pid in sorted(pa, key=lambda i: (pa[i][0], i)):
        if pa[pid][1] != pb[pid][1]:
            raise CompareError(
                f"patient {pid} is labelled {GRADE.get(pa[pid][1], pa[pid][1])} in {a.name} ({a.path}) and "
                f"{GRADE.get(pb[pid][1], pb[pid][1])} in {b.name} ({b.path}): not the same labels"
            )
    order = sorted(pa, key=lambda i: (pa[i][0], i))
    return {
        "ids": order,
        "folds": np.array([pa[i][0] for i in order], dtype=np.int64),
        "labels": np.array([pa[i][1] for i in order], dtype=np.int64),
        "probs_a": np.array([pa[i][2] for i in order], dtype=np.float64),
        "probs_b": np.array([pb[i][2] for i in order], dtype=np.float64),
        "thr_a": np.array([pa[i][3] for i in order], dtype=np.float64),
        "thr_b": np.array([pb[i][3] for i in order], dtype=np.float64),
    }


# --------------------------------------------------------------------------------------------------- statistics
def _guard(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except ValueError as e:  # e.g. fewer than two patients of a grade
        return {"error": str(e)}


def _auc_record(y, p) -> dict:
    """One side's AUC with the interval the reports print (Newcombe's score interval, which does not collapse at
    AUC 1 with few patients) and DeLong's standard error, which the paired test is built on."""
    out = _guard(stats.auc_interval, y, p)
    d = _guard(stats.delong_auc, y, p)
    if "error" not in out and "error" not in d:
        out.update({"se_delong": d["se"], "delong_ci": None if d["degenerate"] else [d["ci_low"], d["ci_high"]]})
    return out


def repeat_stats(m: dict, n_boot: int, seed: int) -> dict:
    y, pa, pb = m["labels"], m["probs_a"], m["probs_b"]
    correct_a = (pa >= m["thr_a"]).astype(np.int64) == y
    correct_b = (pb >= m["thr_b"]).astype(np.int64) == y
    paired = _guard(stats.delong_paired, y, pb, pa)  # B - A
    if "error" not in paired:
        paired = {k: paired[k] for k in ("delta", "se", "z", "p_value", "ci_low", "ci_high")}
    boot = _guard(stats.paired_bootstrap_delta_auc, y, pb, pa, n_boot=n_boot, seed=seed)  # B - A
    if "error" not in boot:
        boot["seed"] = seed
        boot["method"] = "stratified paired bootstrap (same resampled patients for A and B), percentile interval"
    mc = stats.mcnemar_exact(correct_a, correct_b)
    mc.update(
        {
            "b_means": "A right, B wrong",
            "c_means": "A wrong, B right",
            "accuracy_a": float(correct_a.mean()),
            "accuracy_b": float(correct_b.mean()),
        }
    )
    return {
        "n": int(y.size),
        "n_hgg": int(y.sum()),
        "n_lgg": int(y.size - y.sum()),
        "auc_a": _auc_record(y, pa),
        "auc_b": _auc_record(y, pb),
        "delong": paired,
        "bootstrap": boot,
        "mcnemar": mc,
    }


def _n_fit(run: FoldRun | None) -> int | None:
    """The patients the run's network was fitted on (metrics.json final.selection.n_fit), if recorded."""
    final = getattr(run, "final", None)
    value = ((final or {}).get("selection") or {}).get("n_fit") if isinstance(final, dict) else None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def per_fold(m: dict, repeat: int, sides: tuple[Side, ...] = ()) -> list[dict]:
    rows = []
    for fold in np.unique(m["folds"]):
        sel = m["folds"] == fold
        y = m["labels"][sel]
        row = {"repeat": repeat, "fold": int(fold), "n_test": int(sel.sum())}
        fits = [_n_fit(side.runs.get(repeat, {}).get(int(fold))) for side in sides]
        row["n_fit"] = float(np.mean(fits)) if fits and all(f is not None for f in fits) else None
        if len(np.unique(y)) == 2:
            row["auc_a"] = float(roc_auc_score(y, m["probs_a"][sel]))
            row["auc_b"] = float(roc_auc_score(y, m["probs_b"][sel]))
            row["diff"] = row["auc_b"] - row["auc_a"]
        else:
            row["auc_a"] = row["auc_b"] = row["diff"] = math.nan
        rows.append(row)
    return rows


def corrected_ttest(rows: list[dict], n_total: int, n_repeats: int) -> tuple[dict | None, str]:
    if n_repeats < 2:
        return None, (
            "corrected resampled t-test not run: it needs two or more repeats of the CV in both folders "
            f"({n_repeats} in common)"
        )
    ok = [r for r in rows if not math.isnan(r["diff"])]
    skipped = [_where(r["repeat"], r["fold"]) for r in rows if math.isnan(r["diff"])]
    if len(ok) < 2:
        return None, "corrected resampled t-test not run: fewer than two folds with both grades"
    n_test = round(float(np.mean([r["n_test"] for r in ok])))
    if all(r.get("n_fit") is not None for r in ok):
        n_train = round(float(np.mean([r["n_fit"] for r in ok])))
        source = "n_fit: the patients the networks were fitted on (metrics.json final.selection.n_fit, mean)"
    else:
        n_train = n_total - n_test
        source = "outer training size (n - n_test): the runs record no n_fit"
    if n_train <= 0:
        return None, "corrected resampled t-test not run: no training patients left"
    t = stats.corrected_resampled_ttest([r["diff"] for r in ok], n_train, n_test)
    t.update(
        {
            "J": len(ok),
            "n_train": n_train,
            "n_train_source": source,
            "n_test": n_test,
            "difference": "AUC(B) - AUC(A) per (repeat, fold)",
            "skipped_single_grade_folds": skipped,
        }
    )
    return t, "Nadeau & Bengio corrected resampled t-test over per-(repeat, fold) AUC differences"


def _fmt(x, digits: int = 3, sign: bool = False) -> str:
    return fixed(x, digits, sign)


_p = pvalue  # "= 0.27", "< 0.001"


def verdict(d: dict, a: str = "A", b: str = "B") -> str:
    if "error" in d:
        return f"no DeLong test: {d['error']}"
    p = d["p_value"]
    head = (
        f"{b} - {a} = {_fmt(d['delta'], sign=True)} AUC (95 % CI {_fmt(d['ci_low'], 2, True)} to "
        f"{_fmt(d['ci_high'], 2, True)}, DeLong p {_p(p)})"
    )
    if math.isnan(p):
        return f"{head}: no test (zero standard error with a non-zero difference)"
    if p >= ALPHA:
        return f"{head}: no evidence of a difference"
    return f"{head}: evidence that {b} is {'better' if d['delta'] > 0 else 'worse'} than {a} (p < {ALPHA})"


def compare_pair(a: Side, b: Side, n_boot: int, seed: int) -> tuple[dict, list[dict]]:
    notes = _check_splits(a, b)
    common = sorted(set(a.runs) & set(b.runs))
    if not common:
        raise CompareError(
            f"{a.name} ({a.path}) holds repeats {sorted(a.runs)} and {b.name} ({b.path}) repeats {sorted(b.runs)}: "
            "none in common"
        )
    matched = [pair_repeat(a, b, rep) for rep in common]
    per_repeat, rows = [], []
    for rep, m in zip(common, matched, strict=True):
        per_repeat.append({"repeat": rep, **repeat_stats(m, n_boot, seed)})
        rows += per_fold(m, rep, (a, b))
    ttest, ttest_note = corrected_ttest(rows, int(matched[0]["labels"].size), len(common))
    warnings = list(notes)
    if a.protocol != b.protocol:
        warnings.append(
            f"the two sides were selected differently ({a.name}: {a.protocol}, {b.name}: {b.protocol}): a difference "
            "may come from the protocol, not the model"
        )
    outer = [s.name for s in (a, b) if s.protocol in ("outer", "mixed")]
    if outer:
        warnings.append(
            f"{' and '.join(outer)} selected epochs/checkpoints/thresholds on the reported folds (protocol outer, "
            "optimistic): its AUC is biased upwards; retrain with --selection inner for a fair comparison"
        )
    head = per_repeat[0]
    first = matched[0]
    report = {
        "a": str(a.path),
        "b": str(b.path),
        "name_a": a.name,
        "name_b": b.name,
        "k": a.k,
        "repeats": common,
        "repeats_only_in_a": sorted(set(a.runs) - set(b.runs)),
        "repeats_only_in_b": sorted(set(b.runs) - set(a.runs)),
        "headline_repeat": common[0],
        "n": head["n"],
        "n_hgg": head["n_hgg"],
        "n_lgg": head["n_lgg"],
        "fold_sizes": [int(np.sum(first["folds"] == f)) for f in np.unique(first["folds"])],
        "protocol_a": a.protocol,
        "protocol_b": b.protocol,
        "missing_a": a.missing,
        "missing_b": b.missing,
        "thresholds_a": {str(f): _threshold(r) for f, r in sorted(a.runs[common[0]].items())},
        "thresholds_b": {str(f): _threshold(r) for f, r in sorted(b.runs[common[0]].items())},
        "auc_a": head["auc_a"],
        "auc_b": head["auc_b"],
        "delong": head["delong"],
        "bootstrap": head["bootstrap"],
        "mcnemar": head["mcnemar"],
        "per_repeat": per_repeat,
        "per_fold": rows,
        "corrected_ttest": ttest,
        "corrected_ttest_note": ttest_note,
        "warnings": warnings,
        "verdict": verdict(head["delong"], a.name, b.name),
        "settings": setting_differences(a, b),
    }
    return report, matched


# ---------------------------------------------------------------------------------------------------- outputs
def roc_figure(sides: list[Side], path: Path) -> None:
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for side in sides:
        runs = [r for _, r in sorted(side.runs[min(side.runs)].items())]
        y = np.concatenate([np.asarray(r.labels, dtype=np.int64) for r in runs])
        p = np.concatenate([np.asarray(r.probs, dtype=np.float64) for r in runs])
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"{side.name}: {side.path.name} (AUC {roc_auc_score(y, p):.3f}, n = {y.size})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity (HGG)",
        title="pooled out-of-fold ROC",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, dpi=110)


def _auc_cell(d: dict) -> str:
    if "error" in d:
        return "n/a"
    return f"{_fmt(d['auc'])} ({_fmt(d['ci_low'])}-{_fmt(d['ci_high'])})"


def test_rows(pr: dict) -> list[list[str]]:
    """The "| | value |" table of one pair: the patients, both AUCs and every paired test."""
    d, bs, mc, t = pr["delong"], pr["bootstrap"], pr["mcnemar"], pr["corrected_ttest"]
    extra = f" (repeat {pr['headline_repeat']})" if len(pr["repeats"]) > 1 else ""
    rows = [
        [f"patients{extra}", f"{pr['n']} ({pr['n_hgg']} HGG, {pr['n_lgg']} LGG), K = {pr['k']}, fold sizes "
                             f"{pr['fold_sizes']}"],
        ["protocol A / B", f"{pr['protocol_a']} / {pr['protocol_b']}"],
        ["AUC A (95 % CI, Newcombe)", _auc_cell(pr["auc_a"])],
        ["AUC B (95 % CI, Newcombe)", _auc_cell(pr["auc_b"])],
    ]  # fmt: skip
    if "error" in d:
        rows.append(["paired DeLong", d["error"]])
    else:
        rows.append(["B - A, paired DeLong", f"{_fmt(d['delta'], sign=True)} (95 % CI {_fmt(d['ci_low'], sign=True)} "
                     f"to {_fmt(d['ci_high'], sign=True)}), p {pvalue(d['p_value'])}"])  # fmt: skip
    if "error" in bs:
        rows.append(["B - A, paired bootstrap", bs["error"]])
    else:
        rows.append(["B - A, paired bootstrap", f"95 % CI {_fmt(bs['ci_low'], sign=True)} to "
                     f"{_fmt(bs['ci_high'], sign=True)}, p {pvalue(bs['p_value'])} ({bs['n_boot']} resamples, seed "
                     f"{bs['seed']})"])  # fmt: skip
    rows.append(["McNemar (exact), decisions at each run's threshold", f"A right & B wrong: {mc['b']}, A wrong & B "
                 f"right: {mc['c']}, p {pvalue(mc['p_value'])}; accuracy A {_fmt(mc['accuracy_a'])}, B "
                 f"{_fmt(mc['accuracy_b'])}"])  # fmt: skip
    if t:
        rows.append([f"corrected resampled t-test over {t['J']} (repeat, fold)", f"mean B - A "
                     f"{_fmt(t['mean'], sign=True)}, t = {_fmt(t['t'], 2)}, df = {t['df']}, p {pvalue(t['p_value'])} "
                     f"(n_train {t['n_train']}, n_test {t['n_test']})"])  # fmt: skip
    else:
        rows.append(["corrected resampled t-test", pr["corrected_ttest_note"].split(": ", 1)[-1]])
    return rows


def pair_tables(pr: dict) -> dict:
    """One pair of compare.md: its record and its three tables (the per-repeat one only with two or more)."""
    repeats = [
        [r["repeat"], _auc_cell(r["auc_a"]), _auc_cell(r["auc_b"]), _fmt(r["delong"].get("delta"), sign=True),
         pvalue(r["delong"].get("p_value")).removeprefix("= ")]
        for r in pr["per_repeat"]
    ]  # fmt: skip
    folds = [
        [r["repeat"], r["fold"], r["n_test"], _fmt(r["auc_a"]), _fmt(r["auc_b"]), _fmt(r["diff"], sign=True)]
        for r in pr["per_fold"]
    ]
    settings = [[d["setting"], setting_text(d["a"]), setting_text(d["b"])] for d in pr.get("settings", [])]
    return {**pr, "tests": test_rows(pr), "repeats": repeats if len(pr["per_repeat"]) > 1 else [], "folds": folds,
            "setting_rows": settings}  # fmt: skip


def markdown(report: dict) -> str:
    """compare.md (templates/compare.md.j2) of a comparison record."""
    pairs = [pair_tables(pr) for pr in report["pairs"]]
    return render("compare.md.j2", r=report, pairs=pairs, auc_ci_method=stats.AUC_CI_METHOD)


def compare(results: list[str | Path], out: str | Path | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare results folders pairwise with the first (A) on the patients both hold out; write compare.json,
    compare.md and compare_roc.png into `out` (default: a new compare_YYYYMMDD_HHMMSS inside the first folder)."""
    results = [Path(r) for r in results]
    if len(results) < 2:
        raise CompareError("compare needs two or more results folders: the first is the reference A")
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CompareError(f"{out} already holds files; name a new or empty folder for the comparison")
    names = ["A", "B"] if len(results) == 2 else ["A"] + [f"B{i}" for i in range(1, len(results))]
    sides = [load_side(p, n) for p, n in zip(results, names, strict=True)]
    pairs = [compare_pair(sides[0], b, n_boot, seed)[0] for b in sides[1:]]
    if out is None:
        out = new_stamped_dir(results[0], "compare")
    else:
        out.mkdir(parents=True, exist_ok=True)
    report = {
        "reference": str(results[0]),
        "sides": [
            {
                "name": s.name,
                "path": str(s.path),
                "k": s.k,
                "split": s.split,
                "protocol": s.protocol,
                "repeats": sorted(s.runs),
                "missing": s.missing,
                "incomplete_folds": s.problems,
                "runs": [
                    {
                        "repeat": rep,
                        "fold": f,
                        "run_dir": str(r.run_dir),
                        "checkpoint": r.final.get("checkpoint"),
                        "threshold": _threshold(r),
                        "auc": r.final.get("auc"),
                    }
                    for rep, folds in sorted(s.runs.items())
                    for f, r in sorted(folds.items())
                ],
            }
            for s in sides
        ],
        "pairs": pairs,
        "n_boot": n_boot,
        "seed": seed,
        "out": str(out),
    }
    roc = out / "compare_roc.png"
    roc_figure(sides, roc)
    report["figures"] = [str(roc)]
    write_json(out / "compare.json", json_safe(report))
    write_text_atomic(out / "compare.md", markdown(report))
    return report
