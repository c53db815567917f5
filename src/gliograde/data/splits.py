"""Patient-level cross-validation splits, saved as folds.json beside the cache so every run of a fold sees the
same patients. One row of the cache is one patient, so a split by row is a split by patient.

The protocol (folds.json version 2):

* Outer folds, stratified by grade: `StratifiedKFold(k, shuffle=True, random_state=seed + repeat)` for each of
  `repeats` repeats; with `group_by="site"` a `StratifiedGroupKFold` with the acquisition site as the group (no
  site is ever in two folds); with `leave_site_out` one fold per site (deterministic, so one repeat only).
* Inside every outer fold the training patients are split once into `fit` (the model is trained on these) and
  `select` (model selection: early stopping, checkpoint and threshold choice), so that the outer validation
  patients are never used to choose anything. `select` takes `inner_fraction` of the training patients of each
  grade, at least one of each grade, and leaves at least one of each grade to `fit`. The split is seeded from
  (seed, repeat, fold). When the outer folds are grouped by site the selection part is made of whole sites
  whenever some set of training sites gives both parts both grades without taking more than half of the
  training patients (the set closest to the asked fraction, grade by grade, is taken); otherwise that fold
  falls back to the stratified split and records `"inner_grouped": false`.

Layout:

    {"version": 2, "k", "seed", "repeats", "group_by", "leave_site_out", "inner_fraction",
     "stratified_by": "grade", "case_ids", "class_counts": {"LGG": n, "HGG": n},
     "sites": {site: {"HGG": n, "LGG": n}},
     "repeat_sets": [{"repeat": r, "seed": seed + r,
                      "folds": [{"fold", "train", "val", "fit", "select", "inner_grouped"[, "site"]}]}],
     "folds": <repeat 0's folds, for readers of version 1>}

(`"site"`: the held-out site of a leave-site-out fold.) A version 1 file (no "version" key: k, seed and one set
of folds without an inner split) is upgraded in place by `folds_for_cache`, its folds kept as repeat 0.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from gliograde import GRADES
from gliograde.data.brats import site_of
from gliograde.data.cache import VolumeCache
from gliograde.errors import DataError
from gliograde.files import write_json

log = logging.getLogger("gliograde")

FOLDS_FILE = "folds.json"
VERSION = 2
DEFAULTS = {"k": 5, "seed": 42, "repeats": 1, "group_by": None, "leave_site_out": False, "inner_fraction": 0.2}
GROUPINGS = (None, "site")
MIN_TRAIN_PER_GRADE = 2  # every training part: one patient of each grade to select with, one to fit
_EXHAUSTIVE_SITES = 16  # up to this many training sites every subset is tried for a grouped selection part
_RANDOM_ORDERS = 4096  # beyond: the prefixes of this many seeded random orders of the sites


@dataclass(frozen=True)
class SplitSpec:
    """What a caller asks of the split. None means "not asked": an existing folds.json decides, or the default
    (k=5, seed=42, repeats=1, no grouping, no leave-site-out, inner_fraction=0.2) when one is made."""

    k: int | None = None
    seed: int | None = None
    repeats: int | None = None
    group_by: str | None = None
    leave_site_out: bool | None = None
    inner_fraction: float | None = None

    def asked(self) -> dict:
        """The explicitly asked settings (those not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def resolved(self, n_sites: int | None = None) -> SplitSpec:
        """Every setting filled in with its default. Leave-site-out implies group_by="site" and, unless k was
        asked, k = n_sites (k stays None when n_sites is not given)."""
        lso = bool(self.leave_site_out) if self.leave_site_out is not None else DEFAULTS["leave_site_out"]
        k = self.k if self.k is not None else (n_sites if lso else DEFAULTS["k"])
        return SplitSpec(
            k=k,
            seed=self.seed if self.seed is not None else DEFAULTS["seed"],
            repeats=self.repeats if self.repeats is not None else DEFAULTS["repeats"],
            group_by="site" if lso else self.group_by,
            leave_site_out=lso,
            inner_fraction=self.inner_fraction if self.inner_fraction is not None else DEFAULTS["inner_fraction"],
        )


@dataclass
class FoldSplit:
    """Cache row indices of one outer fold: `train` = `fit` + `select`, `val` the held-out patients."""

    train: np.ndarray
    val: np.ndarray
    fit: np.ndarray
    select: np.ndarray

    def __post_init__(self):
        train, val, fit, select = (set(np.asarray(a).tolist()) for a in (self.train, self.val, self.fit, self.select))
        problems = []
        if len(train) != len(self.train) or len(val) != len(self.val):
            problems.append("a patient is listed twice")
        if train & val:
            problems.append(f"{len(train & val)} patient(s) both train and validate")
        if fit & select:
            problems.append(f"{len(fit & select)} patient(s) are in both fit and select")
        if fit | select != train or len(fit) + len(select) != len(self.train):
            problems.append("fit and select do not make up the training patients")
        if problems:
            raise DataError(f"inconsistent fold: {'; '.join(problems)}")


# ------------------------------------------------------------------------------------------------ checks
def _check_params(k=None, seed=None, repeats=None, group_by=None, leave_site_out=None, inner_fraction=None) -> None:
    """Refuse impossible settings (None: not given, not checked)."""

    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if k is not None and (not integer(k) or k < 2):
        raise DataError(f"k (the number of folds, --num-folds) must be an integer of at least 2, got {k!r}")
    if repeats is not None and (not integer(repeats) or repeats < 1):
        raise DataError(f"repeats must be an integer of at least 1, got {repeats!r}")
    if seed is not None and (not integer(seed) or not 0 <= seed <= 2**32 - 1 - (repeats or 1)):
        raise DataError(f"the split seed must be an integer in 0..{2**32 - 1 - (repeats or 1)}, got {seed!r}")
    if inner_fraction is not None and (
        isinstance(inner_fraction, bool)
        or not isinstance(inner_fraction, numbers.Real)
        or not 0 < inner_fraction <= 0.5
    ):
        raise DataError(
            f"inner_fraction must lie in (0, 0.5] (the share of each training part held out for model "
            f"selection), got {inner_fraction!r}"
        )
    if group_by not in GROUPINGS:
        raise DataError(f"group_by must be 'site' or None, got {group_by!r}")
    if leave_site_out and repeats is not None and repeats != 1:
        raise DataError(f"leave-site-out folds are deterministic (one fold per site): repeats must be 1, got {repeats}")


def _site_table(sites, labels) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for site, label in zip(sites, labels, strict=True):
        row = table.setdefault(str(site), {"HGG": 0, "LGG": 0})
        row[GRADES[int(label)]] += 1
    return dict(sorted(table.items()))


def _fmt_sites(table: dict, names) -> str:
    return ", ".join(f"{s} ({table[s]['HGG']} HGG, {table[s]['LGG']} LGG)" for s in names)


def needed_per_grade(k: int) -> int:
    """Patients of each grade that k stratified folds with an inner split need: every fold validates at least
    one, and every training part (at least n - ceil(n/k) of them) keeps MIN_TRAIN_PER_GRADE."""
    n = k
    while n - math.ceil(n / k) < MIN_TRAIN_PER_GRADE:
        n += 1
    return n


def largest_k(counts: dict[str, int], upto: int) -> int | None:
    """The largest K <= upto that stratified folds with an inner split can make from these patients per grade (None:
    none can; `needed_per_grade` is not monotone: 3 folds need 3 of each grade, 2 folds 4)."""
    return next((k for k in range(upto, 1, -1) if all(n >= needed_per_grade(k) for n in counts.values())), None)


def _check_groupable(table: dict, k: int) -> None:
    holding = {g: [s for s, c in table.items() if c[g]] for g in ("LGG", "HGG")}
    largest = min(len(v) for v in holding.values())
    if largest >= k:
        return
    short = "; ".join(
        f"only {len(names)} site(s) hold {g} patients: {_fmt_sites(table, names)}"
        for g, names in holding.items()
        if len(names) < k
    )
    tail = f"largest K possible: {largest}"
    if largest < 2:
        tail += ", so grouping by site is impossible here"
    raise DataError(
        f"cannot make {k} folds grouped by site: every fold must validate patients of both grades and no site may "
        f"be in two folds, but {short}; {tail}"
    )


def _check_sites_known(ids, sites) -> None:
    unknown = [c for c, s in zip(ids, sites, strict=True) if s in ("", "unknown")]
    if unknown:
        raise DataError(
            f"grouping by site needs every patient's site, but {len(unknown)} case(s) have none "
            f"(e.g. {unknown[:3]}); split without grouping"
        )


# ---------------------------------------------------------------------------------------------- splitting
def _leave_site_out_k(table: dict, k: int | None) -> int:
    if len(table) < 2:
        raise DataError(f"leave-site-out needs patients from at least 2 sites, these come from {list(table)}")
    if k is not None and k != len(table):
        raise DataError(
            f"leave-site-out makes one fold per site, {len(table)} here ({', '.join(table)}), "
            f"but k={k} was asked for; leave k out"
        )
    return len(table)


def outer_splits(
    labels, sites=None, k: int | None = 5, seed: int = 42, repeat: int = 0, *, group_by=None, leave_site_out=False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The outer (train_rows, val_rows) of one repeat, checked: the validation parts partition the patients, each
    holds both grades (except a leave-site-out fold of a one-grade site), and grouped folds share no site."""
    labels = np.asarray(labels).astype(int)
    sites = np.array([str(s) for s in sites]) if sites is not None else np.array(["unknown"] * len(labels))
    grouped = leave_site_out or group_by == "site"
    table = _site_table(sites, labels)
    if leave_site_out:
        k = _leave_site_out_k(table, k)
    _check_params(k=k, group_by=group_by)
    counts = {GRADES[c]: int((labels == c).sum()) for c in (0, 1)}
    small = {g: n for g, n in counts.items() if n < k} if not leave_site_out else {}
    if small:
        raise DataError(
            f"cannot make {k} stratified folds: {', '.join(f'{g} has {n} case(s)' for g, n in small.items())}, "
            f"fewer than the {k} folds (each fold needs at least one case of each grade)"
        )
    if grouped:
        _check_sites_known([f"row {i}" for i in range(len(labels))], sites)
    x = np.zeros(len(labels))
    if leave_site_out:
        splits = [(np.flatnonzero(sites != s), np.flatnonzero(sites == s)) for s in table]
    elif group_by == "site":
        _check_groupable(table, k)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + repeat)
        splits = list(splitter.split(x, labels, sites))
    else:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + repeat)
        splits = list(splitter.split(x, labels))

    vals = np.concatenate([v for _, v in splits])
    if len(splits) != k or sorted(vals.tolist()) != list(range(len(labels))):
        raise DataError(f"internal error: the {k} validation parts of repeat {repeat} do not partition the patients")
    for f, (train, val) in enumerate(splits):
        if np.intersect1d(train, val).size or len(train) + len(val) != len(labels):
            raise DataError(f"internal error: fold {f} of repeat {repeat} trains on validation patients")
        if grouped and set(sites[train].tolist()) & set(sites[val].tolist()):
            both = sorted(set(sites[train].tolist()) & set(sites[val].tolist()))
            raise DataError(f"internal error: fold {f} of repeat {repeat} has site(s) {both} in train and val")
        if not leave_site_out and len(set(labels[val].tolist())) < 2:
            raise DataError(
                f"the site-grouped split with seed {seed + repeat} left fold {f} without patients of one grade "
                f"(validating sites {sorted(set(sites[val].tolist()))}); try another seed or fewer folds"
            )
    return splits


def _check_inner_possible(splits, labels, sites, repeat: int, group_by, leave_site_out) -> None:
    for f, (train, val) in enumerate(splits):
        for c in (1, 0):
            n = int((labels[train] == c).sum())
            if n >= MIN_TRAIN_PER_GRADE:
                continue
            g = GRADES[c]
            held = sorted(set(sites[val].tolist()))
            if leave_site_out:
                how = f"leaving site {held[0]} out leaves too few {g} patients; leave-site-out is impossible here"
            elif group_by == "site":
                how = (
                    f"grouping by site leaves too few {g} patients outside the validated sites {held}: "
                    "use fewer folds, or do not group by site"
                )
            else:
                how = "use fewer folds"
            raise DataError(
                f"cannot make the inner selection split: in repeat {repeat}, fold {f} the training part holds {n} "
                f"{g} patient(s), but every training part needs at least {MIN_TRAIN_PER_GRADE} of each grade "
                f"(1 for the selection part, 1 to fit); {how}"
            )


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _grouped_select(train, labels, sites, fraction: float, rng) -> np.ndarray | None:
    """Rows of training sites to select with, or None when no set of whole sites gives both parts both grades
    without taking more than half of the training patients."""
    tsites, tlabels = sites[train], labels[train]
    names = sorted(set(tsites.tolist()))
    m = len(names)
    if m < 2:
        return None
    counts = np.array([[int(((tsites == s) & (tlabels == c)).sum()) for c in (0, 1)] for s in names])
    if m <= _EXHAUSTIVE_SITES:
        masks = ((np.arange(1, 2**m - 1)[:, None] >> np.arange(m)) & 1).astype(bool)
    else:
        ranks = np.argsort(np.argsort(rng.random((_RANDOM_ORDERS, m)), axis=1), axis=1)
        masks = (ranks[:, None, :] < np.arange(1, m)[None, :, None]).reshape(-1, m)
    total = counts.sum(0)
    chosen = masks.astype(np.int64) @ counts
    rest = total - chosen
    ok = (chosen > 0).all(1) & (rest > 0).all(1) & (2 * chosen.sum(1) <= total.sum())
    if not ok.any():
        return None
    cost = np.abs(chosen - fraction * total).sum(1)
    best = np.flatnonzero(ok & np.isclose(cost, cost[ok].min()))
    pick = masks[best[rng.integers(len(best))]]
    return train[np.isin(tsites, [names[i] for i in np.flatnonzero(pick)])]


def _inner_split(train, labels, sites, fraction: float, rng, grouped: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fit, select, whether select is whole sites), both in the order of `train`."""
    select = _grouped_select(train, labels, sites, fraction, rng) if grouped else None
    inner_grouped = select is not None
    if select is None:
        parts = []
        for c in (0, 1):
            members = train[labels[train] == c]
            n = min(max(_round(fraction * len(members)), 1), len(members) - 1)
            parts.append(rng.permutation(members)[:n])
        select = np.concatenate(parts)
    in_select = np.isin(train, select)
    return train[~in_select], train[in_select], inner_grouped


def _fold_entries(ids, labels, sites, splits, seed, repeat, fraction, grouped, leave_site_out, outer_lists=None):
    entries = []
    for f, (train, val) in enumerate(splits):
        rng = np.random.default_rng([seed, repeat, f])
        fit, select, inner_grouped = _inner_split(train, labels, sites, fraction, rng, grouped)
        entry = {
            "fold": f,
            "train": [ids[j] for j in train] if outer_lists is None else outer_lists[f]["train"],
            "val": [ids[j] for j in val] if outer_lists is None else outer_lists[f]["val"],
            "fit": [ids[j] for j in fit],
            "select": [ids[j] for j in select],
            "inner_grouped": inner_grouped,
        }
        if leave_site_out:
            entry["site"] = str(sites[val[0]])
        entries.append(entry)
    return entries


def make_folds(
    ids: list[str],
    labels,
    k: int | None = 5,
    seed: int = 42,
    *,
    repeats: int = 1,
    group_by: str | None = None,
    leave_site_out: bool = False,
    inner_fraction: float = 0.2,
    sites=None,
    patients=None,
    classes: tuple[str, str] = GRADES,
    stratified_by: str = "grade",
) -> dict:
    """The folds.json (version 2) content for these cases; `sites` defaults to the site in each BraTS id.
    With leave_site_out, k may be None (one fold per site). `patients` (one per case; default: each case its own
    patient): a patient's exams land in one fold and one part of the inner split. `classes`: the names of labels
    0 and 1, `stratified_by` the target's name, as the file records them."""
    kw = dict(repeats=repeats, group_by=group_by, leave_site_out=leave_site_out, inner_fraction=inner_fraction,
              classes=classes, stratified_by=stratified_by)  # fmt: skip
    if patients is not None and len(set(patients)) < len(list(ids)):
        return _by_patient(list(ids), labels, sites, list(patients), k, seed, kw)
    ids = list(ids)
    labels = np.asarray(labels).astype(int)
    if len(labels) != len(ids) or not set(labels.tolist()) <= {0, 1}:
        raise DataError(f"{len(ids)} case ids need as many labels of 0 ({classes[0]}) or 1 ({classes[1]}), got "
                        f"{labels.tolist()[:10]}")  # fmt: skip
    sites = np.array([str(s) for s in (sites if sites is not None else map(site_of, ids))])
    if len(sites) != len(ids):
        raise DataError(f"{len(ids)} case ids need as many sites, got {len(sites)}")
    table = _site_table(sites, labels)
    if leave_site_out:
        group_by = "site"
    if group_by == "site":
        _check_sites_known(ids, sites)
    if leave_site_out:
        k = _leave_site_out_k(table, k)
    _check_params(k, seed, repeats, group_by, leave_site_out, inner_fraction)
    counts = {classes[c]: int((labels == c).sum()) for c in (0, 1)}
    if group_by is None:  # exact for StratifiedKFold: checked before splitting
        needed = needed_per_grade(k)
        short = {g: n for g, n in counts.items() if n < needed}
        if short:
            raise DataError(
                f"cannot make {k} stratified folds with an inner selection split: "
                + ", ".join(f"{g} has {n} case(s) where at least {needed} are needed" for g, n in short.items())
                + f" (every fold validates at least one patient of each grade, and every training part needs at "
                f"least {MIN_TRAIN_PER_GRADE} of each grade: 1 for the selection part, 1 to fit)"
            )
    repeat_sets = []
    for r in range(repeats):
        splits = outer_splits(labels, sites, k, seed, r, group_by=group_by, leave_site_out=leave_site_out)
        _check_inner_possible(splits, labels, sites, r, group_by, leave_site_out)
        entries = _fold_entries(ids, labels, sites, splits, seed, r, inner_fraction, group_by == "site", leave_site_out)
        repeat_sets.append({"repeat": r, "seed": seed + r, "folds": entries})
    folds = _document(ids, counts, table, k, seed, repeats, group_by, leave_site_out, inner_fraction, repeat_sets)
    return folds if stratified_by == "grade" else {**folds, "stratified_by": stratified_by}


def _by_patient(ids: list[str], labels, sites, patients: list[str], k, seed, kw: dict) -> dict:
    """make_folds over patients (each with its first exam's label and site), then each patient's exams put where
    the patient went: in the same fold and the same inner part. A patient whose exams disagree on the label is an
    error naming it."""
    labels = np.asarray(labels).astype(int)
    sites = [str(s) for s in (sites if sites is not None else map(site_of, ids))]
    if not len(ids) == len(labels) == len(patients) == len(sites):
        raise DataError(f"{len(ids)} case ids need as many labels, sites and patients")
    exams: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        exams.setdefault(p, []).append(i)
    for p, rows in exams.items():
        if len({int(labels[i]) for i in rows}) > 1:
            raise DataError(f"patient {p}: its exams {[ids[i] for i in rows]} carry different labels")
    first = [rows[0] for rows in exams.values()]
    folds = make_folds(list(exams), labels[first], k, seed, sites=[sites[i] for i in first], **kw)

    def expand(names):
        return [ids[i] for p in names for i in exams[p]]

    for rs in folds["repeat_sets"]:
        for entry in rs["folds"]:
            for key in ("train", "val", "fit", "select"):
                entry[key] = expand(entry[key])
    folds["case_ids"] = list(ids)
    folds["patients"] = {p: [ids[i] for i in rows] for p, rows in exams.items() if len(rows) > 1}
    return folds


def _document(ids, counts, table, k, seed, repeats, group_by, leave_site_out, inner_fraction, repeat_sets) -> dict:
    return {
        "version": VERSION,
        "k": int(k),
        "seed": int(seed),
        "repeats": int(repeats),
        "group_by": group_by,
        "leave_site_out": bool(leave_site_out),
        "inner_fraction": float(inner_fraction),
        "stratified_by": "grade",
        "case_ids": list(ids),
        "class_counts": counts,
        "sites": table,
        "repeat_sets": repeat_sets,
        "folds": repeat_sets[0]["folds"],
    }


def _upgrade_v1(old: dict, cache: VolumeCache, inner_fraction: float) -> dict:
    """A version 1 folds dict as version 2: its folds, unchanged, become repeat 0; the inner split is added."""
    ids = list(old["case_ids"])
    by_id = {c.id: c for c in cache.cases}
    labels = np.array([by_id[c].label for c in ids])
    sites = np.array([by_id[c].site for c in ids])
    row = {c: i for i, c in enumerate(ids)}
    splits = [(np.array([row[c] for c in f["train"]]), np.array([row[c] for c in f["val"]])) for f in old["folds"]]
    vals = sorted(j for _, v in splits for j in v.tolist())
    if len(splits) != old["k"] or vals != list(range(len(ids))) or any(np.intersect1d(t, v).size for t, v in splits):
        raise DataError("the version 1 folds.json does not partition its cases into its k folds; remove it")
    _check_inner_possible(splits, labels, sites, 0, None, False)
    entries = _fold_entries(ids, labels, sites, splits, old["seed"], 0, inner_fraction, False, False, old["folds"])
    counts = {GRADES[c]: int((labels == c).sum()) for c in (0, 1)}
    sets = [{"repeat": 0, "seed": old["seed"], "folds": entries}]
    return _document(
        ids, counts, _site_table(sites, labels), old["k"], old["seed"], 1, None, False, inner_fraction, sets
    )


# ----------------------------------------------------------------------------------------------- planning
@dataclass
class SplitPlan:
    """The split a cache will hold, decided from its case list before anything is preprocessed."""

    spec: SplitSpec  # every setting filled in: what to ask of folds_for_cache
    folds: dict  # the folds document that folds_for_cache will then hold
    source: str  # where K comes from, for messages: "the saved split PATH", "the default", ...
    notes: list[str]  # what was adapted, and why (said, and recorded in the runs' config.json)


def split_spec(cfg) -> SplitSpec:
    """What a training configuration asks of the split (None: not asked; the saved folds.json decides)."""
    return SplitSpec(cfg.folds, cfg.split_seed, cfg.repeats, cfg.group_by, cfg.leave_site_out, cfg.inner_fraction)


def spec_of(folds: dict) -> SplitSpec:
    """Every setting of a saved split, as a SplitSpec."""
    held = _held(folds)
    return SplitSpec(held["k"], held["seed"], held["repeats"], held["group_by"], held["leave_site_out"],
                     held.get("inner_fraction"))  # fmt: skip


def plan_split(ids, labels, sites, spec: SplitSpec, saved: tuple[Path, dict] | None = None, *, patients=None,
               classes: tuple[str, str] = GRADES, stratified_by: str = "grade") -> SplitPlan:  # fmt: skip
    """The split of these patients: `saved` (a folds.json of these very cases: the truth, the settings asked checked
    against it), else a new one. For a new one, K not asked (spec.k None) that the smaller grade cannot hold
    becomes the largest K it can, said in the notes ("4 LGG: 4 folds"); an asked K that cannot work is a DataError
    that says what to pass. Cheap (no volume is read): run it before preprocessing."""
    if saved is not None and sorted(saved[1]["case_ids"]) == sorted(ids):
        check_asked(saved[1], spec, saved[0])
        return SplitPlan(spec_of(saved[1]), saved[1], f"the saved split {saved[0]}", [])
    labels = np.asarray(labels).astype(int)
    r = spec.resolved(n_sites=len({str(s) for s in sites}))
    source, notes = ("--folds" if spec.k is not None else "the default"), []
    if not (r.leave_site_out or r.group_by == "site"):  # grouped splits refuse in make_folds, also before preprocessing
        owners = list(patients) if patients is not None else list(ids)  # folds count patients, not exams
        counts = {classes[c]: len({p for p, y in zip(owners, labels, strict=True) if y == c}) for c in (1, 0)}
        k, why = _fit_k(counts, r.k, asked=spec.k is not None)
        if k != r.k:
            r = SplitSpec(k, r.seed, r.repeats, r.group_by, r.leave_site_out, r.inner_fraction)
            source, notes = f"adapted: {why}", [why]
    folds = make_folds(ids, labels, r.k, r.seed, repeats=r.repeats, group_by=r.group_by,
                       leave_site_out=r.leave_site_out, inner_fraction=r.inner_fraction, sites=sites,
                       patients=patients, classes=classes, stratified_by=stratified_by)  # fmt: skip
    return SplitPlan(r, folds, source, notes)


def _fit_k(counts: dict[str, int], k: int, asked: bool) -> tuple[int, str]:
    """(K, why) for stratified folds with an inner split: k itself where every grade holds it; else, where k was not
    asked, the largest K that fits; else a DataError that says what to pass."""
    needed = needed_per_grade(k)
    short = {g: n for g, n in counts.items() if n < needed}
    if not short:
        return k, ""
    g, n = min(short.items(), key=lambda item: item[1])
    fit = largest_k(counts, max(k, 3))  # 2 folds need more patients than 3 do
    rule = (f"{k} stratified folds with an inner selection split need at least {needed} patients of each grade "
            f"(each fold validates one; each training part keeps {MIN_TRAIN_PER_GRADE}: one to select with, one to "
            "fit)")  # fmt: skip
    if fit is None:
        least = min(needed_per_grade(j) for j in (2, 3))
        raise DataError(f"{g} has {n} case(s): cross-validation with an inner selection split needs at least {least} "
                        f"patients of each grade; add {g} cases")  # fmt: skip
    if asked:
        raise DataError(f"--folds {k}: {g} has {n} case(s), but {rule}; pass --folds {fit}")
    return fit, f"{n} {g}: {fit} folds (the default {k} needs at least {needed} patients of each grade)"


# ----------------------------------------------------------------------------------------------- the file
def _held(folds: dict) -> dict:
    """The settings a loaded folds file was made with (None: a version 1 file has no inner split yet)."""
    if folds.get("version") is None:
        return {"k": folds["k"], "seed": folds["seed"], "repeats": 1, "group_by": None, "leave_site_out": False}
    return {key: folds[key] for key in DEFAULTS}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b)
    return a == b


def _as_spec(spec, k, seed) -> SplitSpec:
    if spec is None:
        return SplitSpec(k=k, seed=seed)
    if isinstance(spec, numbers.Integral) and not isinstance(
        spec, bool
    ):  # the old call folds_for_cache(cache, k, seed)
        if seed is not None:
            raise TypeError("folds_for_cache(cache, k, seed): give seed once")
        return SplitSpec(k=int(spec), seed=k)
    if not isinstance(spec, SplitSpec):
        raise TypeError(f"folds_for_cache: spec must be a SplitSpec, got {type(spec).__name__}")
    for name, value in (("k", k), ("seed", seed)):
        if value is not None and getattr(spec, name) is not None and getattr(spec, name) != value:
            raise TypeError(f"folds_for_cache: {name} given twice ({getattr(spec, name)} and {value})")
    return SplitSpec(
        k=spec.k if spec.k is not None else k,
        seed=spec.seed if spec.seed is not None else seed,
        repeats=spec.repeats,
        group_by=spec.group_by,
        leave_site_out=spec.leave_site_out,
        inner_fraction=spec.inner_fraction,
    )


def folds_for_cache(
    cache: VolumeCache, spec: SplitSpec | None = None, k: int | None = None, seed: int | None = None
) -> dict:
    """The folds of a cache: loaded from its folds.json, or made and saved there on first use.

    The saved split is the truth: settings not asked for (None) are taken from it. Only a setting explicitly
    asked for that differs from it is refused, as is a folds.json made for other cases; changing the folds
    under finished runs would make their results incomparable. A version 1 file is upgraded in place (its
    outer folds kept as repeat 0, the inner split added). The old call `folds_for_cache(cache, k, seed)` still
    works and asks for that k and seed.
    """
    spec = _as_spec(spec, k, seed)
    asked = spec.asked()
    _check_params(**asked)
    path = cache.path / FOLDS_FILE
    if not path.is_file():
        r = spec.resolved(n_sites=len({c.site for c in cache.cases}))
        folds = make_folds(
            cache.ids,
            cache.labels,
            r.k,
            r.seed,
            repeats=r.repeats,
            group_by=r.group_by,
            leave_site_out=r.leave_site_out,
            inner_fraction=r.inner_fraction,
            sites=[c.site for c in cache.cases],
            patients=cache.patients,
            classes=cache.classes,
            stratified_by=cache.target.column,
        )
        write_json(path, folds, indent=1)
        return folds

    folds = load_folds(path)
    if sorted(folds["case_ids"]) != sorted(cache.ids):
        extra = sorted(set(folds["case_ids"]) - set(cache.ids))
        absent = sorted(set(cache.ids) - set(folds["case_ids"]))
        raise DataError(
            f"{path} does not match the cache's cases (in folds only: {extra[:5]}, in cache only: {absent[:5]}); "
            "remove it to make new folds"
        )
    check_asked(folds, spec, path)
    if folds.get("version") is None:
        fraction = spec.inner_fraction if spec.inner_fraction is not None else DEFAULTS["inner_fraction"]
        folds = _upgrade_v1(folds, cache, fraction)
        write_json(path, folds, indent=1)
        log.info("upgraded %s to version %d: folds kept as repeat 0, inner selection split added", path, VERSION)
    return folds


def check_asked(folds: dict, spec: SplitSpec, path: str | Path) -> None:
    """A DataError when a setting explicitly asked for in `spec` differs from the saved split `folds` (of `path`)."""
    path = Path(path)
    held, asked = _held(folds), spec.asked()
    if asked.get("leave_site_out") and "group_by" not in asked:
        asked["group_by"] = "site"
    differ = [key for key, value in asked.items() if key in held and not _same(held[key], value)]
    if differ:
        held_s = ", ".join(f"{key}={held[key]!r}" for key in differ)
        asked_s = ", ".join(f"{key}={asked[key]!r}" for key in differ)
        raise DataError(
            f"{path} holds a split with {held_s}, but {asked_s} {'was' if len(differ) == 1 else 'were'} asked for; "
            f"leave {'it' if len(differ) == 1 else 'them'} out to use the saved split, or remove {path.name} to "
            "make a new one (runs on the old split would no longer be comparable with new ones)"
        )


def load_folds(path: str | Path) -> dict:
    """A folds.json as written (version 1 or 2), its structure checked."""
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
        version = folds.get("version")
        _ = ([(f["fold"], f["train"], f["val"]) for f in folds["folds"]], folds["k"], folds["seed"], folds["case_ids"])
        if version is not None:
            if version != VERSION:
                raise DataError(f"{path} is a version {version} folds file; this gliograde reads versions 1 and 2")
            _ = [folds[key] for key in DEFAULTS]
            if len(folds["repeat_sets"]) != folds["repeats"]:
                raise ValueError(f"{len(folds['repeat_sets'])} repeat sets for repeats={folds['repeats']}")
            for rs in folds["repeat_sets"]:
                if len(rs["folds"]) != folds["k"]:
                    raise ValueError(f"repeat {rs['repeat']} has {len(rs['folds'])} folds for k={folds['k']}")
                _ = [(f["fit"], f["select"], f["train"], f["val"]) for f in rs["folds"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable folds file ({type(e).__name__}: {e})") from e
    return folds


def _entry(folds: dict, fold: int, repeat: int) -> dict:
    repeats = folds.get("repeats", 1)
    if not 0 <= repeat < repeats:
        raise DataError(f"--repeat {repeat} is outside 0..{repeats - 1}")
    if not 0 <= fold < folds["k"]:
        raise DataError(f"--fold {fold} is outside 0..{folds['k'] - 1}")
    return (folds["repeat_sets"][repeat] if "repeat_sets" in folds else folds)["folds"][fold]


def _rows(cache: VolumeCache, case_ids) -> np.ndarray:
    row = {cid: i for i, cid in enumerate(cache.ids)}
    missing = [c for c in case_ids if c not in row]
    if missing:
        raise DataError(f"the folds name case(s) the cache {cache.path} does not hold: {missing[:5]}")
    return np.array([row[c] for c in case_ids], dtype=np.int64)


def fold_split(cache: VolumeCache, folds: dict, fold: int, repeat: int = 0) -> FoldSplit:
    """Row indices of `fold` of `repeat`: train, val, and train split into fit and select, checked."""
    split = _entry(folds, fold, repeat)
    if "fit" not in split:
        raise DataError(
            "these folds have no inner fit/select split (a version 1 folds.json): open them with "
            "folds_for_cache, which upgrades the file"
        )
    return FoldSplit(*(_rows(cache, split[key]) for key in ("train", "val", "fit", "select")))


def describe(folds: dict) -> str:
    """One line: k, repeats, grouping, inner fraction and seed."""
    if folds.get("version") is None:
        return f"{folds['k']} folds stratified by grade, seed {folds['seed']} (version 1: no inner selection split)"
    n = folds["repeats"]
    all_folds = [f for rs in folds["repeat_sets"] for f in rs["folds"]]
    if folds["leave_site_out"]:
        outer = f"leave-site-out: {folds['k']} folds, one per site"
    else:
        outer = f"{folds['k']} folds x {n} repeat{'s' if n != 1 else ''} stratified by grade"
        if folds["group_by"] == "site":
            outer += ", grouped by site"
    inner = f"inner selection {folds['inner_fraction']:.0%} of each training part"
    if folds["group_by"] == "site":
        inner += f" (whole sites in {sum(f.get('inner_grouped', False) for f in all_folds)}/{len(all_folds)} folds)"
    seeds = f"seed {folds['seed']}" + (f"..{folds['seed'] + n - 1}" if n > 1 else "")
    return f"{outer}; {inner}; {seeds}"
