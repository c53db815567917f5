"""gliograde.training.launcher: CV folds as a submitit job array (LocalExecutor here: the code path SLURM runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import tiny

from gliograde.config import check_config, with_split
from gliograde.errors import GliogradeError
from gliograde.training import launcher
from gliograde.training.cv import fold_plan
from gliograde.training.launcher import (
    NO_SBATCH,
    cv_status,
    run_fold_task,
    status_table,
    submit_folds,
    submit_summary,
    wait_and_collect,
)
from gliograde.training.trainer import train_fold

pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def cache16(synth_root, tmp_path_factory):
    from gliograde.data.cache import open_cache, prepare_cache

    out = tmp_path_factory.mktemp("launcher") / "cache"
    return open_cache(prepare_cache(synth_root, out, size=16, workers=1, progress=False).path)


def resolved(cfg):
    """As run_cv: the split resolved (folds.json made once, here) before the per-fold configurations."""
    from gliograde.data.source import load_data

    check_config(cfg)
    cache, split = load_data(cfg)
    return with_split(dataclasses.replace(cfg, cache_dir=str(cache.path.resolve()), fold=0, repeat=0), split)


def run_dirs(cfg) -> list[Path]:
    return sorted(Path(cfg.output_dir).glob("runs/fold_*/run_*"))


@pytest.mark.slow
def test_local_array_trains_the_folds_skips_them_when_resubmitted_and_summarizes(cache16, tmp_path):
    cfg = resolved(tiny(cache16, tmp_path, folds=2, epochs=1, min_epochs=1))
    todo = [dataclasses.replace(cfg, fold=f, resume=None) for f in (0, 1)]
    folder = tmp_path / "jobs"
    jobs = submit_folds(todo, "local", folder, timeout_min=10)
    runs, failures = wait_and_collect(jobs)
    assert failures == {}
    assert sorted(runs) == [(0, 0), (0, 1)]
    for run in runs.values():
        assert json.loads((run / "metrics" / "metrics.json").read_text())["status"] == "complete"
    assert all(Path(j.paths.stderr).is_file() and Path(j.paths.stderr).is_relative_to(folder) for j in jobs)

    rows = cv_status(Path(cfg.output_dir), k=2)
    assert [(r["fold"], r["state"], r["run"]) for r in rows] == [(0, "done", runs[(0, 0)]), (1, "done", runs[(0, 1)])]
    assert "2 done" in status_table(rows)

    before = run_dirs(cfg)
    again = submit_folds(todo, "local", folder, timeout_min=10)  # checked at run time: both complete, skipped
    # beside them (one wave of task processes, not two): a fold outside the split, which fails in its task
    bad = submit_folds([dataclasses.replace(cfg, fold=7)], "local", folder, timeout_min=10)
    summary = submit_summary(Path(cfg.output_dir), again, "local", folder)
    assert run_dirs(cfg) == before
    report = summary.result()
    assert [f["run"] for f in report["folds"]] == [str(runs[(0, 0)]), str(runs[(0, 1)])]
    assert (Path(cfg.output_dir) / "summary.json").is_file()

    runs, failures = wait_and_collect(bad)
    assert runs == {}
    assert list(failures) == [(0, 7)]
    assert failures[(0, 7)].startswith("fold 7 failed: ") and "ConfigError" in failures[(0, 7)]
    assert str(bad[0].paths.stderr) in failures[(0, 7)]
    with pytest.raises(GliogradeError, match="1 fold\\(s\\) failed, no summary: fold 7 failed"):
        submit_summary(Path(cfg.output_dir), bad, "local", folder)


@pytest.mark.slow
def test_a_task_resumes_its_interrupted_fold_in_the_same_folder(cache16, tmp_path):
    cfg = resolved(tiny(cache16, tmp_path, folds=2, epochs=2, min_epochs=2))
    fold0 = dataclasses.replace(cfg, fold=0, resume=None)

    def stop(epoch, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(fold0, on_epoch_end=stop)
    state, run = fold_plan(fold0)
    assert state == "resume"
    assert cv_status(Path(cfg.output_dir))[0]["state"] == "running"
    repeat, fold, run_dir, auc = run_fold_task(fold0.to_dict(), threads=1)  # as a re-queued task would
    assert (repeat, fold, Path(run_dir)) == (0, 0, run)
    assert 0.0 <= auc <= 1.0
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert len(metrics["history"]) == 2
    assert run_dirs(cfg) == [run]


def test_slurm_without_sbatch_is_a_one_line_error(cache16, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.shutil, "which", lambda _: None)
    cfg = tiny(cache16, tmp_path)
    with pytest.raises(GliogradeError) as e:
        submit_folds([cfg], "slurm", tmp_path / "jobs")
    assert str(e.value) == NO_SBATCH
    assert "\n" not in str(e.value)
    with pytest.raises(GliogradeError, match="sbatch is not on PATH"):
        submit_summary(tmp_path, [], "slurm", tmp_path / "jobs")


def test_slurm_array_and_summary_dependency_with_a_stand_in_sbatch(cache16, tmp_path, monkeypatch):
    """Stand-ins for sbatch and srun on PATH; sbatch keeps the scripts: the #SBATCH settings, the afterok."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        f'#!/bin/sh\nn=$(ls {scripts} | wc -l)\ncp "$1" {scripts}/$n.sh\necho "Submitted batch job 10$n"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it too
    for tool in (sbatch, bin_dir / "srun"):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = tiny(cache16, tmp_path, folds=2)
    todo = [dataclasses.replace(cfg, fold=f) for f in (0, 1)]
    jobs = submit_folds(
        todo, "slurm", tmp_path / "jobs", partition="gpu", account="lab", extra_sbatch={"qos": "high"}, timeout_min=90
    )
    assert [j.job_id for j in jobs] == ["100_0", "100_1"]
    array = (scripts / "0.sh").read_text()
    for line in ("--array=0-1", "--partition=gpu", "--account=lab", "--qos=high", "--time=90", "--gpus-per-node=1",
                 "--cpus-per-task=8", "--mem=64GB"):  # fmt: skip
        assert f"#SBATCH {line}" in array, line
    submit_summary(tmp_path / "res", jobs, "slurm", tmp_path / "jobs")
    assert "#SBATCH --dependency=afterok:100_0:100_1" in (scripts / "1.sh").read_text()


def test_cv_status_marks_missing_failed_and_running_folds(tmp_path):
    runs = tmp_path / "runs"

    def make(parent: Path, name: str, metrics: dict | None, log: str | None = None) -> Path:
        run = parent / name
        (run / "metrics").mkdir(parents=True)
        (run / "logs").mkdir()
        if metrics is not None:
            (run / "metrics" / "metrics.json").write_text(json.dumps(metrics))
        if log:
            (run / "logs" / log).write_text("...")
        return run

    make(runs / "fold_0", "run_20240101_000000", {"status": "complete"})  # older, superseded by the failed one
    failed = make(runs / "fold_0", "run_20240102_000000", {"status": "failed", "reason": "ValueError: bad"}, "t.log")
    running = make(runs / "fold_1", "run_20240101_000000", {"status": "running"})
    other = make(runs / "repeat_1" / "fold_2", "run_20240101_000000", None)

    rows = {(r["repeat"], r["fold"]): r for r in cv_status(tmp_path, k=3, repeats=2)}
    assert sorted(rows) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert rows[(0, 0)] == {"repeat": 0, "fold": 0, "state": "failed", "run": failed,
                                 "reason": "ValueError: bad", "log": failed / "logs" / "t.log"}  # fmt: skip
    assert (rows[(0, 1)]["state"], rows[(0, 1)]["run"]) == ("running", running)
    assert (rows[(1, 2)]["state"], rows[(1, 2)]["run"]) == ("running", other)
    assert [rows[key]["state"] for key in ((0, 2), (1, 0), (1, 1))] == ["missing"] * 3
    table = status_table(list(rows.values()))
    assert "ValueError: bad (log: " in table and str(failed / "logs" / "t.log") in table
    assert table.splitlines()[-1] == "1 failed, 3 missing, 2 running"
    assert [(r["fold"], r["state"]) for r in cv_status(tmp_path)] == [(0, "failed"), (1, "running"), (2, "running")]
