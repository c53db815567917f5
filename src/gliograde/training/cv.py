"""`gliograde cv`: every fold with one configuration, then the summary.

Resumable: per fold, a complete run with the same configuration is kept, an interrupted one (with last.pt) is
resumed, otherwise a new run starts. `parallel` > 1 trains that many folds at once in spawned processes, each on
its own GPU where several are visible (or sharing the CPU cores).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import torch

from gliograde.checkpoints import LAST
from gliograde.config import TrainConfig, load_run_config, with_split
from gliograde.data.splits import describe
from gliograde.errors import GliogradeError
from gliograde.evaluation.summary import summarize
from gliograde.runs import run_order_key, run_status

log = logging.getLogger("gliograde")


SPLIT_SETTINGS = ("folds", "split_seed", "repeats", "group_by", "leave_site_out", "inner_fraction")


class CVError(GliogradeError):
    pass


def fold_plan(cfg: TrainConfig) -> tuple[str, Path | None]:
    """('done', run) / ('resume', run) / ('new', None) for cfg's fold and repeat, looking at its newest runs."""
    from gliograde.training.run_folder import fold_parent

    parent = fold_parent(cfg.output_dir, cfg.fold, cfg.repeat)
    if not parent.is_dir():
        return "new", None
    # a split setting not asked for (None) is the saved split's: it matches whatever the run recorded
    want = {k: v for k, v in cfg.identity().items() if not (k in SPLIT_SETTINGS and v is None)}
    for run in sorted((d for d in parent.glob("run_*") if d.is_dir()), key=run_order_key, reverse=True):
        try:
            saved = load_run_config(run).identity()
        except GliogradeError:
            continue
        same = all(saved.get(k) == v for k, v in want.items())
        if not same:
            continue
        if run_status(run) == "complete":
            return "done", run
        if (run / "checkpoints" / LAST).is_file():
            return "resume", run
    return "new", None


def physical_gpus(count: int, visible: str | None) -> list[str]:
    """The ids to put in a child's CUDA_VISIBLE_DEVICES for this process's GPUs 0..count-1: this process may itself
    see a subset (CUDA_VISIBLE_DEVICES=2,5 makes its GPU 1 the physical GPU 5), so index through that list."""
    if visible is None or not visible.strip():
        return [str(i) for i in range(count)]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[:count]


def _train_child(values: dict, gpu: str | None, threads: int, level: int, results) -> None:
    """A fold in a spawned process of its own (so that its GPU can be pinned before CUDA starts): train, and send
    (fold, run_dir, final) or (fold, None, reason) back. Every failure is caught and named, a CUDA out-of-memory
    included, so that one fold's failure never takes the others down."""
    fold, key = values["fold"], (values.get("repeat", 0), values["fold"])
    try:
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        torch.set_num_threads(threads)
        logging.basicConfig(level=level, format=f"[fold {fold}] %(levelname)s: %(message)s")
        from gliograde.training.trainer import train_fold

        result = train_fold(TrainConfig(**values))
        results.put((key, str(result.run_dir), result.final))
    except GliogradeError as e:
        results.put((key, None, str(e)))
    except torch.cuda.OutOfMemoryError as e:
        from gliograde import runtime

        results.put((key, None, runtime.oom_message(e, values["batch_size"], values["grad_accum"])))
    except BaseException as e:  # a bug or a signal: named, logged in full here, and reported to the parent
        log.exception("%s failed", name(key))
        results.put((key, None, f"{type(e).__name__}: {e}"))


def _train_parallel(todo: list[TrainConfig], workers: int, gpus: list[str], threads: int) -> tuple[dict, dict]:
    """Train the folds in spawned processes, `workers` at a time, each on a free GPU of its own where there are
    GPUs; a process per fold (never reused: a CUDA context cannot change GPU). Returns (runs, failures)."""
    ctx = get_context("spawn")
    results = ctx.Queue()
    free: list[str | None] = list(gpus) if gpus else [None] * workers
    pending, running, runs, failures = list(todo), {}, {}, {}
    level = log.getEffectiveLevel()
    while pending or running:
        while pending and free and len(running) < workers:
            fcfg, gpu = pending.pop(0), free.pop(0)
            proc = ctx.Process(target=_train_child, args=(fcfg.to_dict(), gpu, threads, level, results))
            proc.start()
            running[(fcfg.repeat, fcfg.fold)] = (proc, gpu)
        try:
            key, run_dir, detail = results.get(timeout=2.0)
        except queue.Empty:  # a child that died without a word (killed, out of host memory) is a failed fold
            for key, (proc, gpu) in list(running.items()):
                if proc.exitcode not in (None, 0):
                    failures[key] = f"its process died with exit code {proc.exitcode}"
                    log.error("%s failed: %s", name(key), failures[key])
                    running.pop(key)
                    free.append(gpu)
            continue
        key = tuple(key)
        if key not in running:  # counted as died, but its result had been sent before the process exited badly
            if run_dir is not None and key in failures:
                failures.pop(key)
                runs[key] = Path(run_dir)
                log.info("%s finished after all: AUC %.4f (%s)", name(key), detail["auc"], run_dir)
            continue
        proc, gpu = running.pop(key)
        proc.join()
        free.append(gpu)
        if run_dir is None:
            log.error("%s failed: %s", name(key), detail)
            failures[key] = detail
        else:
            runs[key] = Path(run_dir)
            log.info("%s finished: AUC %.4f (%s)", name(key), detail["auc"], run_dir)
    return runs, failures


def plan_cv(
    cfg: TrainConfig, only: str | list[int] | None = None, explicit: set[str] | None = None
) -> tuple[TrainConfig, list[int], list, dict]:
    """The CV to run: (cfg with the saved split filled in, the folds, the configs still to train (resume set for an
    interrupted one), the complete runs kept). Planned first (training/plan.py: device, folds against the grades,
    batch against the training parts; `explicit`: the keys the user set, the others may be adapted), before any
    case is preprocessed; then the cache and folds.json are made here, once, never by folds racing each other in
    parallel processes or cluster jobs."""
    from gliograde.data.source import load_data
    from gliograde.training.plan import plan_run

    plan = plan_run(dataclasses.replace(cfg, fold=0, repeat=0), explicit, only)
    cache, split = load_data(plan.cfg)
    cfg = with_split(dataclasses.replace(plan.cfg, cache_dir=str(cache.path.resolve())), split)
    log.info("split: %s", describe(split))
    folds = plan.folds
    todo, runs = [], {}
    for repeat in range(cfg.repeats):
        for fold in folds:
            fcfg = dataclasses.replace(cfg, fold=fold, repeat=repeat, resume=None)
            key = (repeat, fold)
            state, run = fold_plan(fcfg)
            if state == "done":
                log.info("%s: complete run %s with this configuration; skipped", name(key), run)
                runs[key] = run
                continue
            if state == "resume":
                log.info("%s: resuming the interrupted run %s", name(key), run)
                fcfg.resume = str(run)
            todo.append(fcfg)
    return cfg, folds, todo, runs


def run_cv(
    cfg: TrainConfig,
    only: str | list[int] | None = None,
    parallel: int = 1,
    allow_partial: bool = False,
    explicit: set[str] | None = None,
) -> dict:
    """Train (or skip, or resume) each fold of each repeat, then summarize the results folder; returns the summary.
    `only`: the folds to run ("0-4", "0,2" or a list; default all K), in every repeat. `explicit`: the configuration
    keys the user set (training/plan.py adapts the others where the cohort cannot hold them; None: adapt none)."""
    cfg, folds, todo, runs = plan_cv(cfg, only, explicit)
    with resume_hint(RERUN_CV):
        failures = _train_folds(todo, folds, runs, parallel)
    if failures and not allow_partial:
        detail = "; ".join(f"{name(key)}: {why}" for key, why in sorted(failures.items()))
        raise CVError(
            f"{len(failures)} fold(s) failed ({detail}). Completed folds are kept: once the cause is fixed, run the "
            "same cv command again (complete folds are skipped)."
        )
    # the runs of this configuration, by name: a newer run made with other settings must not slip in
    subset = folds != list(range(cfg.folds))
    if subset:
        log.warning("--only %s is a subset of the %d folds: the summary is labelled partial", folds, cfg.folds)
    return summarize(cfg.output_dir, runs=[runs[k] for k in sorted(runs)], allow_partial=allow_partial or subset)


RERUN_CV = "re-run the same gliograde cv command to resume (complete folds are skipped, this one goes on from last.pt)"


@contextmanager
def resume_hint(text: str):
    """What an interrupted fold suggests (the trainer reads GLIOGRADE_RESUME_HINT, as do the fold processes this one
    starts): under cv, the cv command, not `gliograde train --resume`."""
    before = os.environ.get("GLIOGRADE_RESUME_HINT")
    os.environ["GLIOGRADE_RESUME_HINT"] = text
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLIOGRADE_RESUME_HINT", None)
        else:
            os.environ["GLIOGRADE_RESUME_HINT"] = before


def _train_folds(todo: list[TrainConfig], folds: list[int], runs: dict, parallel: int) -> dict:
    """Train the configurations of `todo` (one by one, or `parallel` at a time), adding their runs to `runs`;
    returns the failures."""
    from gliograde.training.trainer import train_fold

    failures: dict[tuple[int, int], str] = {}
    if parallel <= 1 or len(todo) <= 1:
        for fcfg in todo:
            key = (fcfg.repeat, fcfg.fold)
            log.info("===== %s of %s =====", name(key), folds)
            try:
                runs[key] = train_fold(fcfg).run_dir
            except Exception as e:  # as under --parallel-folds: the fold is named, the others go on
                failures[key] = fold_failure(key, e)
    else:
        gpus = physical_gpus(torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = min(parallel, len(todo), len(gpus)) if gpus else min(parallel, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        where = f" on GPUs {','.join(gpus)}" if gpus else ""
        log.info("training %d folds, %d at a time%s", len(todo), workers, where)
        done, failed = _train_parallel(todo, workers, gpus, threads)
        runs.update(done)
        failures.update(failed)
    return failures


def fold_failure(key: tuple[int, int], error: Exception) -> str:
    """One line for a failed fold; a failure that is not one of ours (a CUDA, cuDNN or NCCL RuntimeError, a bug)
    is logged with its traceback first, since its message alone may not say where it came from."""
    if isinstance(error, GliogradeError):
        why = str(error)
    else:
        log.exception("%s failed", name(key))
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    log.error("%s failed: %s", name(key), why)
    return why


def name(key: tuple[int, int]) -> str:
    repeat, fold = key
    return f"fold {fold}" if repeat == 0 else f"fold {fold} of repeat {repeat}"
