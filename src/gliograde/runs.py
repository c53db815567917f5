"""The runs of a results folder: finding them (the newest complete run of each fold and repeat), reading one, and
comparing their configurations. `summarize`, `compare`, `predict`, `validate`, `export` and `cv --status` all read
runs through here; nothing in here scores or trains."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gliograde.config import RUNTIME_FIELDS
from gliograde.errors import GliogradeError


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
        values = {label(r.key): r.config.get(k, "<absent>") for r in runs}
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
