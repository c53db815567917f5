"""The runs of a results folder: finding them (the newest complete run of each fold and repeat), reading one,
comparing their configurations, and a fold's row (its metrics recomputed from its saved predictions). `summarize`,
`compare`, `predict`, `validate`, `export` and `cv --status` all read runs through here; nothing in here runs a
model or trains."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gliograde import GRADES
from gliograde.config import BUILTIN_NETWORKS, CHOICES, IMPLIED_BEFORE_ADDED, RUNTIME_FIELDS, network_name
from gliograde.errors import GliogradeError
from gliograde.evaluation import stats
from gliograde.evaluation.metrics import compute_metrics, summarized_names


class SummaryError(GliogradeError):
    """Runs that cannot be read or put together, said in one line."""


@dataclass
class FoldRun:
    fold: int
    run_dir: Path
    final: dict
    folds: int  # K of the run's configuration
    ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    repeat: int = 0
    protocol: str = "outer"  # inner | outer (runs made before the protocol was recorded: outer, the seeds')
    cache_dir: str | None = None
    split: tuple = ()  # the split settings of the run's configuration (K, seed, repeats, grouping, inner part)
    config: dict = field(default_factory=dict)  # what it computes: the configuration less runtime and fold fields
    provenance: dict = field(default_factory=dict)  # hashes, code version, environment

    @property
    def key(self) -> tuple[int, int]:
        return self.repeat, self.fold

    @property
    def classes(self) -> tuple[str, str]:
        """The names of labels 0 and 1: the per-class keys of its final metrics, negative first (HGG/LGG for the
        seeds' target; a cohort's own, e.g. IDH not wildtype / IDH wildtype)."""
        return classes_of(self.final)


def classes_of(metrics: dict | None) -> tuple[str, str]:
    """The class names a run's final metrics, a summary or a validation record carries ("classes", else the
    per-class keys), negative first; HGG and LGG for records written before targets."""
    names = tuple((metrics or {}).get("classes") or (metrics or {}).get("per_class") or ())
    return names if len(names) == 2 else GRADES


# ------------------------------------------------------------------------------------------------ finding runs
def run_order_key(path: Path) -> tuple[str, int]:
    m = re.fullmatch(r"run_(\d{8}_\d{6})(?:_(\d+))?", path.name)
    return (m.group(1), int(m.group(2) or 1)) if m else ("", 0)


def run_status(run_dir: Path) -> str:
    """'complete', 'running' (or interrupted), or why the folder is not a readable run."""
    try:
        metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    except (OSError, ValueError):
        return "no readable metrics/metrics.json"
    if metrics.get("status") == "failed":
        return f"failed: {metrics.get('reason', 'no reason recorded')}"
    if metrics.get("status") != "complete":
        return "running or interrupted"
    if not (run_dir / "predictions" / "val_probs.npy").is_file():
        return "complete but without predictions/"
    return "complete"


def read_run(run_dir: Path) -> FoldRun:
    run_dir = Path(run_dir)
    status = run_status(run_dir)
    if status != "complete":
        raise SummaryError(f"{run_dir}: {status}")
    metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    config = json.loads((run_dir / "config" / "config.json").read_text())["config"]
    p = run_dir / "predictions"
    ids = json.loads((p / "val_ids.json").read_text())
    labels, probs = np.load(p / "val_labels.npy"), np.load(p / "val_probs.npy")
    if not len(ids) == len(labels) == len(probs):
        raise SummaryError(f"{p}: {len(ids)} ids, {len(labels)} labels and {len(probs)} probabilities")
    protocol = (metrics.get("selection") or metrics["final"].get("selection") or {}).get("protocol", "outer")
    return FoldRun(
        int(metrics["fold"]),
        run_dir,
        metrics["final"],
        int(config["folds"]),
        ids,
        labels,
        probs,
        int(metrics.get("repeat", config.get("repeat", 0)) or 0),
        protocol,
        config.get("cache_dir"),
        tuple(
            config.get(k) for k in ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction")
        ),
        {k: v for k, v in config.items() if k not in RUNTIME_FIELDS and k not in FOLD_BOOKKEEPING},
        run_provenance(json.loads((run_dir / "config" / "config.json").read_text())),
    )


FOLD_BOOKKEEPING = ("fold", "repeat")
# checked on their own, with their own messages: the split settings and the selection protocol
OWN_CHECKS = ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction", "selection")


def run_provenance(record: dict) -> dict:
    env = record.get("environment") or {}
    keep = ("git_commit", "git_dirty", "torch", "cuda", "cudnn", "gliograde", "device")
    return {**{k: env.get(k) for k in keep if k in env}, **(record.get("provenance") or {}),
            "precision": (env.get("precision") or {}).get("name")}  # fmt: skip


def who_holds(chosen: dict, attr: str) -> str:
    """ "value: fold 0, fold 2; other value: fold 1" for a run attribute on which the runs differ."""
    values = sorted({getattr(r, attr) for r in chosen.values()}, key=str)
    return "; ".join(
        f"{v}: {', '.join(label(key) for key, r in sorted(chosen.items()) if getattr(r, attr) == v)}" for v in values
    )


def config_differences(runs: list[FoldRun]) -> dict[str, dict[str, object]]:
    """The configuration keys (fold bookkeeping and runtime fields aside) on which the runs differ: key -> {run
    label: value}."""
    keys = sorted({k for r in runs for k in r.config} - set(OWN_CHECKS))
    out = {}
    for k in keys:
        values = {label(r.key): r.config.get(k, IMPLIED_BEFORE_ADDED.get(k, "<absent>")) for r in runs}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[k] = values
    return out


def shared(runs: list[FoldRun], attr: str) -> dict:
    """The entries of a per-run dict that all runs share."""
    first = getattr(runs[0], attr)
    return {k: v for k, v in first.items() if all(getattr(r, attr).get(k) == v for r in runs[1:])}


def find_runs(results_dir: Path) -> tuple[dict[tuple[int, int], FoldRun], dict[tuple[int, int], str]]:
    """The newest complete run of each (repeat, fold) under results_dir/runs/fold_k/ (repeat 0, the seeds' layout)
    and runs/repeat_r/fold_k/, and why the other (repeat, fold) pairs found have none."""
    runs_root = Path(results_dir) / "runs"
    if not runs_root.is_dir():
        raise SummaryError(f"{results_dir} holds no runs/ folder; train folds first (gliograde cv or train)")
    parents = [(0, runs_root)] + [
        (int(m.group(1)), d)
        for d in sorted(runs_root.glob("repeat_*"))
        if (m := re.fullmatch(r"repeat_(\d+)", d.name)) and d.is_dir()
    ]
    chosen, problems = {}, {}
    for repeat, parent in parents:
        for fold_dir in sorted(parent.glob("fold_*")):
            m = re.fullmatch(r"fold_(\d+)", fold_dir.name)
            if not m:
                continue
            key = (repeat, int(m.group(1)))
            candidates = sorted((d for d in fold_dir.glob("run_*") if d.is_dir()), key=run_order_key, reverse=True)
            for run in candidates:
                if run_status(run) == "complete":
                    chosen[key] = read_run(run)
                    break
            else:
                problems[key] = ", ".join(f"{r.name}: {run_status(r)}" for r in candidates) or "no runs"
    return chosen, problems


def label(key: tuple[int, int]) -> str:
    repeat, fold = key
    return f"fold {fold}" if repeat == 0 else f"repeat {repeat} fold {fold}"


def run_environment(run_dir: Path) -> dict:
    """The environment a run recorded in its config.json (device, precision, ...); {} for a run without one."""
    path = Path(run_dir) / "config" / "config.json"
    try:
        return json.loads(path.read_text()).get("environment") or {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------- what a run trained
def run_model(run_dir: Path) -> dict:
    """What a run trained, from its config.json: network, depth, layout, input (modalities, size) and preset; {}
    where the run records no readable configuration."""
    try:
        config = json.loads((Path(run_dir) / "config" / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    model, depth = config.get("model", "resnet3d"), config.get("depth")  # runs before --model: the 3D ResNet
    load_architectures(model)
    return {
        "network": network_name(model, depth) if depth is not None else None,
        "model": model,
        "depth": depth if model in BUILTIN_NETWORKS else None,  # the ResNets' setting: MONAI's networks name theirs
        "layout": config.get("layout") if model == "resnet3d" else None,  # the ResNet-3D's setting only
        "modalities": config.get("modalities"),
        "size": config.get("size"),
        "preset": config.get("preset"),
    }


def runs_model(run_dirs: list[Path]) -> dict:
    """run_model over several runs: a value they share, or "mixed: a / b" where they differ (the preset, a
    runtime field, may; the rest only under --allow-mixed)."""
    models = [run_model(r) for r in run_dirs]
    out = {}
    for key in dict.fromkeys(k for m in models for k in m):
        values = list(dict.fromkeys(json.dumps(m.get(key)) for m in models))
        out[key] = json.loads(values[0]) if len(values) == 1 else "mixed: " + " / ".join(map(_plain, values))
    return out


def _plain(encoded: str) -> str:
    value = json.loads(encoded)
    if value is None:
        return "not recorded"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def model_line(model: dict) -> str:
    """ "ResNet10-3D (depth 10, strided layout); input 4 channel(s) t1,t1ce,t2,flair at 32^3; preset cpu-demo": the
    first line of every summary and validation. What the runs did not record reads "not recorded"."""
    m = model or {}
    network = m.get("network") or "network not recorded"
    if m.get("depth") is not None:
        network += f" (depth {m['depth']}" + (f", {m['layout']} layout)" if m.get("layout") else ")")
    return f"{network}; input {input_text(m)}; preset {m.get('preset') or 'not recorded'}"


def input_text(model: dict) -> str:
    """ "4 channel(s) t1,t1ce,t2,flair at 32^3", or "not recorded" where a run recorded neither."""
    mods, size = model.get("modalities"), model.get("size")
    if mods is None and size is None:
        return "not recorded"
    channels = f"{len(mods)} channel(s) {','.join(map(str, mods))}" if isinstance(mods, list) else str(mods)
    return f"{channels} at {size if size is not None else '?'}^3"


# ---------------------------------------------------------------------------------------- the default folder
def default_results_dir(preset: str | None = None, config_file: str | None = None, **overrides) -> Path:
    """The results folder of a configuration: its output_dir (given in a config file, else results/<network> of its
    model and depth). With nothing given, the seeds' results/ResNet50-3D. `cv` and `train` write there; `summarize`,
    `predict` and `validate` read there when no folder is named."""
    from gliograde.config import resolve

    cfg = resolve(preset or "final", config_file, **overrides)
    if load_architectures(cfg.model):  # the network's name and defaults were not known: resolved again with them
        cfg = resolve(preset or "final", config_file, **overrides)
    return Path(cfg.output_dir)


def load_architectures(model: str) -> bool:
    """Import the architecture table where `model` is not a built-in network and the table is not loaded yet (its
    `display` names the results folder): True if it was imported now. The seeds' networks need no torch here."""
    if model in BUILTIN_NETWORKS or "model" in CHOICES:
        return False
    from gliograde import networks  # noqa: F401  (registers the architectures in config.CHOICES)

    return True


def require_results_dir(path: Path, flag: str) -> Path:
    """A default results folder that exists, else one line saying which results/<network> folders do."""
    path = Path(path)
    if path.is_dir():
        return path
    others = sorted(d for d in path.parent.glob("*") if d != path and (d / "runs").is_dir())
    hint = f"train it first (gliograde cv), or name a results folder with {flag}"
    if len(others) == 1:
        hint = (f"{others[0]} does: pass {flag} {others[0]}, or the --preset/--model/--depth/--config it was trained "
                "with")  # fmt: skip
    elif others:
        hint = f"{', '.join(map(str, others))} do: name one with {flag}"
    raise SummaryError(f"{flag} {path} (the default of this configuration) does not exist; {hint}")


def threshold_of(runs: list[FoldRun]) -> np.ndarray | float:
    """Each patient's own fold's decision threshold (fitted on that fold's selection part), in pooled order."""
    if all("threshold" not in r.final for r in runs):
        return 0.5
    return np.concatenate([np.full(len(r.ids), float(r.final.get("threshold", 0.5))) for r in runs])


def fold_row(r: FoldRun) -> dict:
    """One fold's row, its metrics recomputed from its saved predictions at its own threshold (so that a grade the
    fold lacks reads NaN in runs written before that rule too)."""
    f = r.final
    threshold = f.get("threshold", 0.5)
    m = compute_metrics(r.labels, r.probs, threshold, r.classes)
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
        **{k: float(m[k]) for k in summarized_names()},  # the table of metrics (evaluation/metrics.py)
    }
    c = stats.auc_ci_or_reason(r.labels, r.probs)
    row["auc_ci95"] = [c["ci_low"], c["ci_high"]] if "ci_low" in c else None
    row["auc_ci_method"] = "Newcombe (2006) score, method 5" if "ci_low" in c else c.get("error")
    d = stats.delong_or_reason(r.labels, r.probs)
    ok = "ci_low" in d and not d.get("degenerate")
    row["auc_ci95_delong"] = [d["ci_low"], d["ci_high"]] if ok else None  # reference only; null where it collapses
    row["brier"] = stats.brier(r.labels, r.probs)
    row["ece"] = stats.ece(r.labels, r.probs)
    return row
