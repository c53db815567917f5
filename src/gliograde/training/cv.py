"""`gliograde cv`: every fold with one configuration, then the summary.

Resumable: per fold, a complete run with the same configuration is kept, an interrupted one (with last.pt) is
resumed, otherwise a new run starts. `parallel` > 1 trains that many folds at once in spawned processes, each on
its own GPU where several are visible (or sharing the CPU cores).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from gliograde.config import TrainConfig, load_run_config, validate
from gliograde.errors import GliogradeError
from gliograde.evaluation.summary import run_order_key, run_status, summarize
from gliograde.training.checkpoints import LAST

log = logging.getLogger("gliograde")


class CVError(GliogradeError):
    pass


def fold_plan(cfg: TrainConfig) -> tuple[str, Path | None]:
    """('done', run) / ('resume', run) / ('new', None) for cfg.fold, looking at that fold's newest runs."""
    parent = Path(cfg.output_dir) / "runs" / f"fold_{cfg.fold}"
    if not parent.is_dir():
        return "new", None
    want = cfg.identity()
    for run in sorted((d for d in parent.glob("run_*") if d.is_dir()), key=run_order_key, reverse=True):
        try:
            same = load_run_config(run).identity() == want
        except GliogradeError:
            continue
        if not same:
            continue
        if run_status(run) == "complete":
            return "done", run
        if (run / "checkpoints" / LAST).is_file():
            return "resume", run
    return "new", None


def _train_child(values: dict, free_gpus, threads: int, level: int) -> tuple[int, str, dict]:
    """A fold in a spawned process: take a free GPU (pinned before CUDA starts) and give it back at the end,
    share the cores, prefix its log lines."""
    gpu = free_gpus.get() if free_gpus is not None else None
    try:
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        torch.set_num_threads(threads)
        logging.basicConfig(level=level, format=f"[fold {values['fold']}] %(levelname)s: %(message)s")
        from gliograde.training.trainer import train_fold

        result = train_fold(TrainConfig(**values))
        return values["fold"], str(result.run_dir), result.final
    finally:
        if gpu is not None:
            free_gpus.put(gpu)


def run_cv(cfg: TrainConfig, folds: list[int], parallel: int = 1, allow_partial: bool = False) -> dict:
    """Train (or skip, or resume) each fold, then summarize the results folder; returns the summary."""
    validate(cfg, log)
    from gliograde.training.trainer import load_data, train_fold

    # the cache and folds.json are made once, here, not by folds racing each other in parallel processes
    cache, _ = load_data(cfg)
    cfg = dataclasses.replace(cfg, cache_dir=str(cache.path.resolve()))
    todo, runs = [], {}
    for fold in folds:
        fcfg = dataclasses.replace(cfg, fold=fold, resume=None)
        state, run = fold_plan(fcfg)
        if state == "done":
            log.info("fold %d: complete run %s with this configuration; skipped", fold, run)
            runs[fold] = run
            continue
        if state == "resume":
            log.info("fold %d: resuming the interrupted run %s", fold, run)
            fcfg.resume = str(run)
        todo.append(fcfg)

    failures: dict[int, str] = {}
    if parallel <= 1 or len(todo) <= 1:
        for fcfg in todo:
            log.info("===== fold %d of %s =====", fcfg.fold, folds)
            try:
                runs[fcfg.fold] = train_fold(fcfg).run_dir
            except GliogradeError as e:
                log.error("fold %d failed: %s", fcfg.fold, e)
                failures[fcfg.fold] = str(e)
    else:
        gpus = torch.cuda.device_count()
        workers = min(parallel, len(todo), gpus) if gpus else min(parallel, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        log.info("training %d folds, %d at a time%s", len(todo), workers, f" on {gpus} GPUs" if gpus else "")
        ctx = get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            free_gpus = None
            if gpus:  # a fold takes whichever GPU is free, never one still busy with another fold
                free_gpus = manager.Queue()
                for g in range(gpus):
                    free_gpus.put(g)
            level = log.getEffectiveLevel()
            futures = {pool.submit(_train_child, f.to_dict(), free_gpus, threads, level): f for f in todo}
            for fut in as_completed(futures):
                fold = futures[fut].fold
                try:
                    _, run_dir, final = fut.result()
                    runs[fold] = Path(run_dir)
                    log.info("fold %d finished: AUC %.4f (%s)", fold, final["auc"], run_dir)
                except GliogradeError as e:
                    log.error("fold %d failed: %s", fold, e)
                    failures[fold] = str(e)
    if failures and not allow_partial:
        detail = "; ".join(f"fold {f}: {why}" for f, why in sorted(failures.items()))
        raise CVError(f"{len(failures)} fold(s) failed ({detail}). Completed folds are kept; run cv again to resume.")
    # the runs of this configuration, by name: a newer run made with other settings must not slip in
    subset = folds != list(range(cfg.folds))
    if subset:
        log.warning("--folds %s is a subset of the %d folds: the summary is labelled partial", folds, cfg.folds)
    return summarize(cfg.output_dir, runs=[runs[f] for f in sorted(runs)], allow_partial=allow_partial or subset)
