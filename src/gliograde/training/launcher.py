"""Cross-validation folds as cluster jobs: a submitit job array (SLURM, or local subprocesses), then the summary.

    jobs = submit_folds(todo, "slurm", results / "slurm", partition="gpu")   # one array task per (repeat, fold)
    runs, failures = wait_and_collect(jobs)                                  # or leave them queued and log out
    submit_summary(results, jobs, "slurm", results / "slurm")                # afterok: runs once all succeeded
    print(status_table(cv_status(results, k=5)))                             # at any time, from the run folders

Each task runs `run_fold_task`, which re-checks `fold_plan` when it *starts*, not when it was submitted: a task
re-queued by SLURM (pre-emption, or a timeout: submitit signals it and re-submits it, see `run_fold_task.checkpoint`)
or submitted again resumes its fold's interrupted run from last.pt, and skips a fold that is already complete.

"local" runs the very same code path with `submitit.LocalExecutor`: every task in a subprocess of its own, sharing
the CPU cores; where there are GPUs, each task gets --gpus-per-task GPUs of its own (round robin), and tasks given
the same GPUs take turns (`gpu_slot`), so that five folds on two GPUs never run three at once on one.
submitit is an optional dependency: `pip install gliograde[slurm]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gliograde.config import TrainConfig
from gliograde.errors import GliogradeError
from gliograde.files import number

log = logging.getLogger("gliograde")

LAUNCHERS = ("slurm", "local")
NO_SBATCH = (
    "--launcher slurm: sbatch is not on PATH (not a SLURM login node?); use --launcher local to run the same code "
    "path here"
)


class LauncherError(GliogradeError):
    pass


# ------------------------------------------------------------------------------------------------ the task
def local_gpu_groups(n_tasks: int, gpus: list[str], per_task: int) -> list[str | None]:
    """The GPUs (a CUDA_VISIBLE_DEVICES value) of each local task: the machine's GPUs in groups of per_task, taken
    round robin; None for every task where there are no GPUs (or fewer than one group)."""
    per_task = max(1, per_task)
    groups = [",".join(gpus[i : i + per_task]) for i in range(0, len(gpus) - per_task + 1, per_task)]
    return [groups[i % len(groups)] if groups else None for i in range(n_tasks)]


@contextmanager
def gpu_slot(gpus: str | None, lock_dir: str | None):
    """Hold the local task's GPUs alone: tasks given the same GPUs (more folds than GPU groups) take turns on an
    exclusive file lock instead of running at once on one GPU. Nothing to hold without GPUs."""
    if gpus is None or lock_dir is None:
        yield
        return
    import fcntl

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(lock_dir) / f"gpu_{gpus.replace(',', '_')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the task dies
        yield


def run_fold_task(
    values: dict, threads: int | None = None, gpus: str | None = None, lock_dir: str | None = None
) -> tuple[int, int, str, float]:
    """One array task: TrainConfig(**values)'s fold, planned now (done: skipped, interrupted: resumed, else new) and
    trained. Returns (repeat, fold, run_dir, final AUC). A failure raises (submitit records it, with its traceback,
    in the task's stderr log); a CUDA out-of-memory error is turned into the usual one-line advice.
    `gpus` (local tasks): this task's physical GPUs, set before CUDA starts, held alone (`gpu_slot`)."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    with gpu_slot(gpus, lock_dir):
        return _run_fold_task(values, threads)


def _run_fold_task(values: dict, threads: int | None) -> tuple[int, int, str, float]:
    import torch

    from gliograde import runtime
    from gliograde.training.cv import fold_plan, name
    from gliograde.training.trainer import train_fold

    if not logging.getLogger().handlers:  # in a fresh task process: INFO to stdout/stderr, i.e. the task's log
        logging.basicConfig(level=logging.INFO, format=f"[fold {values['fold']}] %(levelname)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    cfg = dataclasses.replace(TrainConfig(**values), resume=None)  # the plan at submission time may be stale
    key = (cfg.repeat, cfg.fold)
    state, run = fold_plan(cfg)
    if state == "done":
        log.info("%s: complete run %s with this configuration; skipped", name(key), run)
        final = json.loads((run / "metrics" / "metrics.json").read_text())["final"]
        return cfg.repeat, cfg.fold, str(run), number(final["auc"])  # null (undefined AUC) back to NaN
    if state == "resume":
        log.info("%s: resuming the interrupted run %s", name(key), run)
        cfg = dataclasses.replace(cfg, resume=str(run))
    try:
        result = train_fold(cfg)
    except torch.cuda.OutOfMemoryError as e:
        raise LauncherError(f"{name(key)}: {runtime.oom_message(e, cfg.batch_size, cfg.grad_accum)}") from e
    return cfg.repeat, cfg.fold, str(result.run_dir), number(result.final["auc"])  # read back from JSON under DDP


def _requeue(values: dict, threads: int | None = None, gpus: str | None = None, lock_dir: str | None = None):
    """submitit calls this (any callable with a `checkpoint` attribute is checkpointable) when SLURM signals a
    timeout or a pre-emption: the task is re-queued with the same arguments, and `run_fold_task` then resumes the
    fold from its last.pt (at most the epoch in progress is lost)."""
    from submitit.helpers import DelayedSubmission

    return DelayedSubmission(run_fold_task, values, threads, gpus, lock_dir)


run_fold_task.checkpoint = _requeue  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ submitting
def _submitit():
    try:
        import submitit
    except ImportError as e:
        raise LauncherError(
            "--launcher needs submitit: pip install 'gliograde[slurm]' (or pip install submitit)"
        ) from e
    return submitit


def _executor(launcher: str, folder: Path, *, name: str, slurm: dict, timeout_min: int, gpus: int):
    """A submitit executor logging under folder/%j: AutoExecutor(cluster="slurm") or LocalExecutor."""
    if launcher not in LAUNCHERS:
        raise LauncherError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise LauncherError(NO_SBATCH)
    submitit = _submitit()
    folder = Path(folder)
    logs = str(folder / "%j")
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=logs, cluster="slurm")
        executor.update_parameters(name=name, timeout_min=timeout_min, gpus_per_node=gpus, tasks_per_node=1, **slurm)
    else:
        import torch

        executor = submitit.LocalExecutor(folder=logs)
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=min(gpus, torch.cuda.device_count()))
    return executor


def _tidy(folder: Path) -> None:
    """submitit's LocalExecutor makes the folder pattern itself ("%j", literally) before it names the jobs' folders:
    an empty folder nobody needs."""
    pattern = Path(folder) / "%j"
    if pattern.is_dir() and not any(pattern.iterdir()):
        pattern.rmdir()


def submit_folds(
    todo: list[TrainConfig],
    launcher: str,
    folder: Path,
    *,
    partition: str | None = None,
    gpus_per_task: int = 1,
    cpus_per_task: int = 8,
    mem_gb: int = 64,
    timeout_min: int = 720,
    account: str | None = None,
    extra_sbatch: dict | None = None,
) -> list:
    """Submit one job-array task per configuration in `todo` (each with its fold and repeat set, the split already
    resolved as run_cv does); returns the submitit jobs. `extra_sbatch`: further #SBATCH settings, e.g.
    {"qos": "high", "constraint": "a100"} (submitit's slurm_additional_parameters). Logs: folder/<job id>_*."""
    if not todo:
        return []
    slurm: dict = {"cpus_per_task": cpus_per_task, "mem_gb": mem_gb}
    if partition:
        slurm["slurm_partition"] = partition
    if account:
        slurm["slurm_account"] = account
    if extra_sbatch:
        slurm["slurm_additional_parameters"] = dict(extra_sbatch)
    executor = _executor(
        launcher, folder, name="gliograde-fold", slurm=slurm, timeout_min=timeout_min, gpus=gpus_per_task
    )
    values = [cfg.to_dict() for cfg in todo]
    if launcher == "slurm":  # SLURM gives each task its own GPUs and cores
        jobs = executor.map_array(run_fold_task, values, [cpus_per_task] * len(values))
    else:  # local tasks start at once: each gets GPUs of its own, taking turns where folds outnumber GPU groups
        import torch

        from gliograde.training.cv import physical_gpus

        gpus = physical_gpus(torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        assigned = local_gpu_groups(len(values), gpus, gpus_per_task)
        at_once = len(set(assigned)) if gpus else len(values)
        threads = max(1, (os.cpu_count() or 1) // at_once)  # share the cores between the tasks running at once
        locks = str(Path(folder) / "gpu_locks")
        jobs = executor.map_array(run_fold_task, values, [threads] * len(values), assigned, [locks] * len(values))
        if gpus:
            log.info("local tasks on GPUs %s, one fold at a time per GPU group", sorted(set(assigned)))
    _tidy(folder)
    from gliograde.training.cv import name

    for cfg, job in zip(todo, jobs, strict=True):
        job.gliograde_key = (cfg.repeat, cfg.fold)  # for wait_and_collect's messages, even if a task dies silently
        log.info("%s: %s job %s (log %s)", name(job.gliograde_key), launcher, job.job_id, job.paths.stderr)
    return jobs


def wait_and_collect(jobs: list) -> tuple[dict[tuple[int, int], Path], dict[tuple[int, int], str]]:
    """Wait for every job; returns (runs: (repeat, fold) -> run folder, failures: (repeat, fold) -> why, naming the
    fold and its stderr log)."""
    from gliograde.training.cv import name

    runs, failures = {}, {}
    for job in jobs:
        key = getattr(job, "gliograde_key", None)
        try:
            repeat, fold, run_dir, auc = job.result()
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError: the task's traceback as text
            key = key or (0, -1)
            failures[key] = f"{name(key)} failed: {_last_line(e)} (log: {job.paths.stderr})"
            log.error("%s", failures[key])
            continue
        runs[(repeat, fold)] = Path(run_dir)
        log.info("%s finished: AUC %.4f (%s)", name((repeat, fold)), auc, run_dir)
    return runs, failures


def _last_line(error: BaseException) -> str:
    """One line for a failed task: the exception line that ends the traceback in submitit's FailedJobError, or,
    for a task that died without a result (killed, out of memory, cancelled), submitit's 'has not produced any
    output (state: ...)'."""
    text = str(error).strip()
    parts = re.split(r"^-{10,}$", text, flags=re.MULTILINE)
    if text.startswith("Job (task=") and len(parts) >= 3:  # "...with trace:", ----, traceback, ----, "check logs"
        lines = [ln.strip() for ln in parts[1].splitlines() if ln.strip()]
        return lines[-1] if lines else type(error).__name__
    lines = [ln.strip() for ln in parts[0].splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def submit_summary(
    results_dir: Path,
    after: list,
    launcher: str,
    folder: Path,
    *,
    allow_partial: bool = False,
    partition: str | None = None,
    account: str | None = None,
    timeout_min: int = 60,
):
    """Submit `summarize(results_dir)` to run once every job in `after` has succeeded; returns its submitit job
    (job.result(): the summary report). SLURM: a CPU job with --dependency=afterok:<ids> (it never starts if a fold
    failed; run `gliograde summarize` after fixing and re-submitting that fold). Local: waits for `after` here, then
    runs it as a local job; a failed fold raises a LauncherError naming it, as afterok would not start it."""
    slurm: dict = {"cpus_per_task": 2, "mem_gb": 16}
    if partition:
        slurm["slurm_partition"] = partition
    if account:
        slurm["slurm_account"] = account
    if launcher == "slurm" and after:
        slurm["slurm_additional_parameters"] = {"dependency": "afterok:" + ":".join(str(j.job_id) for j in after)}
    executor = _executor(launcher, folder, name="gliograde-summary", slurm=slurm, timeout_min=timeout_min, gpus=0)
    if launcher == "local":
        _, failures = wait_and_collect(after)
        if failures:
            raise LauncherError(f"{len(failures)} fold(s) failed, no summary: " + "; ".join(failures.values()))
    from gliograde.evaluation.summary import summarize

    job = executor.submit(summarize, str(results_dir), allow_partial=allow_partial)
    _tidy(folder)
    log.info("summary: %s job %s (log %s)", launcher, job.job_id, job.paths.stderr)
    return job


@dataclass
class JobSettings:
    """What `cv --launcher` asks of the scheduler, per fold task (and the summary's partition and account)."""

    launcher: str  # slurm | local
    jobs_dir: str | None = None  # submitit logs; default <output_dir>/jobs
    partition: str | None = None
    account: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 720
    sbatch: list[str] = field(default_factory=list)  # KEY=VALUE: further #SBATCH settings
    allow_partial: bool = False  # summarize even if folds are missing


def sbatch_options(items: list[str]) -> dict[str, str] | None:
    """--sbatch KEY=VALUE ... as a dict; an item without '=' is refused, named."""
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise LauncherError(f"--sbatch {bad[0]!r}: give KEY=VALUE, e.g. --sbatch qos=high constraint=a100")
    return dict(item.split("=", 1) for item in items) or None


def launch_cv(cfg: TrainConfig, jobs: JobSettings, fold_list: str | list[int] | None = None,
              explicit: set[str] | None = None) -> tuple[list, object]:  # fmt: skip
    """cv through submitit: the folds still to train as a job array (each task resumes its fold when it finds it
    unfinished), then the summary: by a dependent job on SLURM, at once locally (waiting for the folds, failures
    logged). `explicit`: the configuration keys the user set. Returns (fold jobs, summary job)."""
    from gliograde.training.cv import RERUN_CV, name, plan_cv, resume_hint

    if jobs.launcher == "slurm" and shutil.which("sbatch") is None:
        raise LauncherError(NO_SBATCH)  # before any cache is prepared
    extra = sbatch_options(jobs.sbatch)
    cfg, _, todo, _ = plan_cv(cfg, fold_list, explicit)
    folder = Path(jobs.jobs_dir or Path(cfg.output_dir) / "jobs")
    options = {"partition": jobs.partition, "account": jobs.account}
    with resume_hint(RERUN_CV):  # the local tasks inherit it
        submitted = submit_folds(todo, jobs.launcher, folder, gpus_per_task=jobs.gpus_per_task,
                                 cpus_per_task=jobs.cpus_per_task, mem_gb=jobs.mem_gb, timeout_min=jobs.time_min,
                                 extra_sbatch=extra, **options)  # fmt: skip
        if submitted:
            log.info("submitted %d fold(s) (%s): %s", len(submitted), jobs.launcher,
                     ", ".join(j.job_id for j in submitted))  # fmt: skip
        if jobs.launcher == "local":
            _, failures = wait_and_collect(submitted) if submitted else ({}, {})
            for key, why in sorted(failures.items()):
                log.error("%s failed: %s", name(key), why)
            options = {}  # the local summary job takes no scheduler options
        summary = submit_summary(cfg.output_dir, submitted, jobs.launcher, folder, allow_partial=jobs.allow_partial,
                                 **options)  # fmt: skip
    return submitted, summary


# ------------------------------------------------------------------------------------------------ status
def _fold_parents(results_dir: Path) -> dict[tuple[int, int], Path]:
    runs = Path(results_dir) / "runs"
    found = {}
    for parent in runs.glob("fold_*"):
        if parent.is_dir() and parent.name[5:].isdigit():
            found[(0, int(parent.name[5:]))] = parent
    for rep in runs.glob("repeat_*"):
        if not (rep.is_dir() and rep.name[7:].isdigit()):
            continue
        for parent in rep.glob("fold_*"):
            if parent.is_dir() and parent.name[5:].isdigit():
                found[(int(rep.name[7:]), int(parent.name[5:]))] = parent
    return found


def recorded_split(results_dir: Path) -> tuple[int | None, int | None]:
    """(K, repeats) of the CV under results_dir: from the configuration its runs recorded (config/config.json),
    else from the saved folds.json of their cache; None for what no run and no folds.json tells. Runs of
    different splits: the largest K and number of repeats (with a warning), so that no fold goes unlisted."""
    from gliograde.data.splits import FOLDS_FILE, load_folds

    ks, reps, caches = set(), set(), set()
    for parent in _fold_parents(results_dir).values():
        for run in parent.glob("run_*"):
            try:
                config = json.loads((run / "config" / "config.json").read_text())["config"]
                ks.update([int(config["folds"])] if config.get("folds") else [])
                reps.update([int(config["repeats"])] if config.get("repeats") else [])
                caches.update([str(config["cache_dir"])] if config.get("cache_dir") else [])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not (yet) a readable run configuration
    for cache in sorted(caches):
        if ks and reps:
            break
        try:
            folds = load_folds(Path(cache) / FOLDS_FILE)
        except GliogradeError:
            continue  # the cache moved or was removed
        ks = ks or {int(folds["k"])}
        reps = reps or {int(folds.get("repeats", 1))}
    if len(ks) > 1 or len(reps) > 1:
        log.warning("the runs under %s come from different splits (K %s, repeats %s): folds listed up to the largest",
                    results_dir, sorted(ks), sorted(reps))  # fmt: skip
    return (max(ks) if ks else None), (max(reps) if reps else (1 if ks else None))


def cv_status(results_dir: Path, k: int | None = None, repeats: int | None = None) -> list[dict]:
    """One row per (repeat, fold) under results_dir/runs, from its newest run folder: {"repeat", "fold", "state",
    "run", "reason", "log"}. state: 'done' (complete), 'running' (running or interrupted: resumable when it has
    last.pt), 'failed' (reason: why; log: the run's newest logs/*.log), or 'missing' (no run yet), for every fold of
    every repeat: k folds in each of `repeats` repeats, both taken from the runs' recorded split (`recorded_split`)
    when not given."""
    from gliograde.runs import run_order_key, run_status

    if k is None or repeats is None:
        found_k, found_repeats = recorded_split(results_dir)
        k = found_k if k is None else k
        repeats = found_repeats if repeats is None else repeats
    rows = {}
    for key, parent in _fold_parents(results_dir).items():
        runs = sorted((d for d in parent.glob("run_*") if d.is_dir()), key=run_order_key)
        if not runs:
            continue
        run = runs[-1]
        status = run_status(run)
        logs = sorted(run.glob("logs/*.log"), key=lambda p: (p.stat().st_mtime, p.name))
        newest_log = logs[-1] if logs else None
        if status == "complete":
            state, reason = "done", None
        elif status == "running or interrupted":
            state, reason = "running", None
        elif status == "no readable metrics/metrics.json":  # metrics.json comes at the end of the first epoch
            state, reason = "running", "no epoch finished yet (or killed before one did)"
        else:
            state, reason = "failed", status.removeprefix("failed: ")
        rows[key] = {"repeat": key[0], "fold": key[1], "state": state, "run": run, "reason": reason,
                     "log": newest_log if state == "failed" else None}  # fmt: skip
    if k is not None:
        for repeat in range(repeats or 1):
            for fold in range(k):
                if (repeat, fold) not in rows:
                    rows[(repeat, fold)] = {"repeat": repeat, "fold": fold, "state": "missing", "run": None,
                                            "reason": None, "log": None}  # fmt: skip
    return [rows[key] for key in sorted(rows)]


def status_table(rows: list[dict]) -> str:
    """cv_status's rows as a plain-text table, with a count of each state at the end."""
    header = ("repeat", "fold", "state", "run", "detail")
    lines = []
    for r in rows:
        detail = ""
        if r["reason"]:
            detail = r["reason"] + (f" (log: {r['log']})" if r["log"] else "")
        lines.append((str(r["repeat"]), str(r["fold"]), r["state"], str(r["run"] or "-"), detail))
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*line).rstrip() for line in lines]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) if counts else "no runs found")
    return "\n".join(out)
