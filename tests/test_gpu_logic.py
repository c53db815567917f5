"""The GPU path's logic, tested on the CPU: the DDP batch plan, each rank's share of a step, empty validation shards,
process counts, the precision kept across a resume, the bounded checkpoint writer, one GPU per local task, and a
fold that dies of a CUDA error in a sequential CV."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny

from gliograde.data.augment import AugmentParams
from gliograde.data.device_path import DeviceStream, DeviceVolumes
from gliograde.errors import GliogradeError
from gliograde.evaluation.scoring import score_loader
from gliograde.training import distributed
from gliograde.training.distributed import DistributedError, plan_batch


# ------------------------------------------------------------------------------------------------ the batch plan
def test_the_configured_global_batch_is_split_over_the_ranks():
    p = plan_batch(4, 2, 2)  # the case: 4 x 2 on 2 processes is a global batch of 8, not 16
    assert (p.global_batch, p.micro_batch, p.accumulation, p.sync_bn) == (8, 4, 1, False)
    p = plan_batch(4, 4, 2)
    assert (p.global_batch, p.micro_batch, p.accumulation) == (16, 4, 2)
    p = plan_batch(8, 1, 4)  # the final preset on 4 GPUs: 2 volumes per GPU
    assert (p.global_batch, p.micro_batch, p.accumulation) == (8, 2, 1)
    p = plan_batch(4, 2, 1)  # one process: exactly what was configured
    assert (p.global_batch, p.micro_batch, p.accumulation) == (8, 4, 2)
    assert plan_batch(4, 2, 2).to_dict()["convention"] == "global"


def test_a_world_size_that_cannot_hold_the_batch_is_refused_in_one_line():
    with pytest.raises(DistributedError) as e:
        plan_batch(6, 1, 4)
    assert str(e.value).startswith("the global batch 6 (--batch-size 6 x --gradient-accumulation-steps 1) cannot "
                                   "be split evenly over 4 processes") and "\n" not in str(e.value)  # fmt: skip


def test_a_micro_batch_of_one_volume_gets_syncbn_on_gpus_and_is_refused_on_the_cpu():
    p = plan_batch(8, 1, 8, cuda=True)  # the final preset on a node of 8
    assert (p.micro_batch, p.accumulation, p.sync_bn) == (1, 1, True) and "SyncBatchNorm switched on" in p.note
    with pytest.raises(DistributedError, match="micro-batch of 1 volume: BatchNorm would see one volume"):
        plan_batch(8, 1, 8, cuda=False)
    # the MIL model normalises over its k slices: one volume per rank is fine
    assert not plan_batch(8, 1, 8, cuda=False, batchnorm_per_volume=False).sync_bn


def test_batch_per_gpu_grows_the_global_batch_on_request():
    p = plan_batch(4, 2, 2, per_gpu=True)
    assert (p.global_batch, p.micro_batch, p.accumulation, p.per_gpu) == (16, 4, 2, True)
    assert p.to_dict()["convention"] == "per-gpu"


def _volumes(tiny_cache):
    return DeviceVolumes(tiny_cache, np.arange(len(tiny_cache.ids)), [0, 3], torch.device("cpu"))


@pytest.mark.parametrize("batch,accum,world", [(4, 2, 2), (4, 1, 2), (2, 3, 3), (4, 2, 4)])
def test_the_ranks_together_see_exactly_the_augmented_step_of_one_process(tiny_cache, batch, accum, world):
    volumes, p = _volumes(tiny_cache), AugmentParams()
    plan = plan_batch(batch, accum, world, batchnorm_per_volume=False)
    one = DeviceStream(volumes, batch, "weighted", torch.Generator().manual_seed(3), p, accum)
    ranks = [DeviceStream(volumes, batch, "weighted", torch.Generator().manual_seed(3), p, accum, r, world,
                          plan.micro_batch) for r in range(world)]  # fmt: skip
    assert one.steps == ranks[0].steps >= 1 and len(ranks[0]) == one.steps * plan.accumulation
    single = list(one)
    shares = [list(s) for s in ranks]
    for step in range(one.steps):
        expected_x = torch.cat([x for x, _ in single[step * accum : (step + 1) * accum]])
        expected_y = torch.cat([y for _, y in single[step * accum : (step + 1) * accum]])
        a = plan.accumulation
        got = [mb for r in range(world) for mb in shares[r][step * a : (step + 1) * a]]
        assert all(len(y) == plan.micro_batch for _, y in got)
        torch.testing.assert_close(torch.cat([x for x, _ in got]), expected_x)
        assert torch.equal(torch.cat([y for _, y in got]), expected_y)


# ----------------------------------------------------------------------------------------------- small sets
def test_a_rank_whose_validation_share_is_empty_scores_nothing_instead_of_crashing(tiny_cache):
    volumes = DeviceVolumes(tiny_cache, np.arange(2), [0], torch.device("cpu"))
    assert [len(y) for _, y in volumes.batches(16, rank=1, world=4)] == [1]
    assert list(volumes.batches(16, rank=3, world=4)) == []  # 2 cases, 4 ranks
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    loss, probs, labels = score_loader(model, volumes.batches(16, 3, 4), "cpu", None, torch.nn.CrossEntropyLoss(),
                                  allow_empty=True)  # fmt: skip
    assert np.isnan(loss) and probs.shape == labels.shape == (0,)
    with pytest.raises(ValueError, match="yielded no batches"):  # the final scoring of rank 0 still insists
        score_loader(model, volumes.batches(16, 3, 4), "cpu", None, torch.nn.CrossEntropyLoss())


def test_merging_shards_leaves_out_the_loss_of_an_empty_one():
    # 2 volumes on 3 ranks: rank r scored volume r; rank 2 none
    parts = [(0.5, np.array([0.1]), np.array([0])), (0.7, np.array([0.2]), np.array([1])),
             (float("nan"), np.empty(0), np.empty(0, np.int64))]  # fmt: skip
    loss, probs, labels = distributed.merge_shards(parts, 3)
    assert loss == pytest.approx(0.6)
    assert probs.tolist() == [0.1, 0.2] and labels.tolist() == [0, 1]


# -------------------------------------------------------------------------------------------- process counts
def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(distributed, "uses_cuda", lambda request="auto": request != "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DistributedError) as e:
        distributed.processes(4, "auto")
    assert str(e.value).startswith("--nproc 4: only 2 GPU(s) are visible here") and "\n" not in str(e.value)
    assert distributed.processes(None, "auto") == 2 and distributed.processes(2, "cuda") == 2
    assert distributed.processes(3, "cpu") == 3  # gloo processes on the CPU: as many as asked


def test_a_rank_without_a_gpu_of_its_own_is_refused_before_set_device(monkeypatch):
    monkeypatch.setattr(distributed, "uses_cuda", lambda request="auto": True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DistributedError, match="local rank 1, but this node sees 1 GPU"):
        distributed.setup("auto")


def test_train_refuses_nproc_beyond_the_gpus_before_making_anything(tiny_cache, tmp_path, monkeypatch):
    from gliograde.training.trainer import train_fold

    monkeypatch.setattr(distributed, "uses_cuda", lambda request="auto": True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedError, match="--nproc 2: only 1 GPU"):
        train_fold(tiny(tiny_cache, tmp_path, multi_gpu=True, nproc=2, device="auto"))
    assert not (tmp_path / "res").exists()


# ------------------------------------------------------------------------------------ precision across resume
def _interrupted(cache, tmp_path, epochs=2, after=1, **kw):
    """A run of `epochs` epochs (3 folds of conftest's twelve phantoms: fp16 on the CPU is slow) stopped (Ctrl-C) once
    epoch `after` is saved; its folder."""
    from gliograde.training.trainer import train_fold

    def stop(epoch, run_dir):
        if epoch == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(tiny(cache, tmp_path, epochs=epochs, min_epochs=epochs, folds=3, **kw), on_epoch_end=stop)
    return next((tmp_path / "res" / "runs" / "fold_0").iterdir())


@pytest.mark.slow
def test_resume_keeps_the_runs_precision_instead_of_deciding_again(small_cache, tmp_path):
    from gliograde.training.trainer import train_fold

    run = _interrupted(small_cache, tmp_path, precision="bf16")  # (auto would decide fp32 on this CPU)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["precision"]["name"] == "bf16"
    resumed = train_fold(tiny(small_cache, tmp_path, epochs=2, min_epochs=2, folds=3, resume=str(run)))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["precision"]["name"] == "bf16"
    assert "kept on resume" in last["precision"]["reason"] and resumed.final["precision"]["name"] == "bf16"


@pytest.mark.slow
def test_an_fp32_run_resumed_in_fp16_gets_a_fresh_scaler_and_then_resumes_with_its_own(small_cache, tmp_path, caplog):
    """Before: RuntimeError 'The source state dict is empty, possibly because it was saved from a disabled instance
    of GradScaler' (a traceback). One run, three legs (one training for both cases): an fp32 epoch; resumed in fp16
    as asked, with a fresh GradScaler, and stopped after epoch 2; resumed again: an fp16 run with its own scaler."""
    from gliograde.training.trainer import train_fold

    run = _interrupted(small_cache, tmp_path, epochs=3)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["scaler_state_dict"] == {}
    _interrupted(small_cache, tmp_path, epochs=3, after=2, precision="fp16", resume=str(run))
    assert "trained in fp32 until epoch 1; it goes on in fp16 as asked (with a fresh GradScaler)" in caplog.text
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["precision"]["name"] == "fp16" and last["scaler_state_dict"]["scale"] > 0
    (change,) = json.loads((run / "config" / "config.json").read_text())["precision_changes"]
    assert (change["after_epoch"], change["from"], change["to"]) == (1, "fp32", "fp16")

    scale = last["scaler_state_dict"]["scale"]  # the fp16 run's own scaler, saved with epoch 2
    train_fold(tiny(small_cache, tmp_path, epochs=3, min_epochs=3, folds=3, resume=str(run)))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["precision"]["name"] == "fp16"
    assert 0 < last["scaler_state_dict"]["scale"] <= scale * 2
    assert len(json.loads((run / "config" / "config.json").read_text())["precision_changes"]) == 1  # kept, not changed


# ----------------------------------------------------------------------------------------- checkpoint writer
def test_the_checkpoint_writer_keeps_one_pending_copy_per_file_when_the_disk_lags(tmp_path, monkeypatch):
    from gliograde import checkpoints

    gate, written = threading.Event(), []
    real = checkpoints.save_checkpoint

    def slow(payload, path):  # a filesystem slower than all 30 epochs: nothing is written before the gate opens
        assert gate.wait(600), "the gate never opened"
        written.append((path.name, int(payload["epoch"])))
        real(payload, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow)
    writer = checkpoints.CheckpointWriter()
    for epoch in range(1, 31):
        if epoch % 10 == 0:
            writer.submit({"model_state_dict": {}, "epoch": torch.tensor(epoch)}, tmp_path / "best.pt")
        last = {"model_state_dict": {"w": torch.zeros(1000)}, "epoch": torch.tensor(epoch)}
        writer.submit(last, tmp_path / "last.pt")
        assert writer.pending() <= 3  # the one being written, one last.pt, one best.pt: not 30 epochs of copies
    gate.set()
    writer.close()
    # whichever payload the thread took first (it may wake at any epoch), then the newest of each file, last.pt last
    assert written[-1] == ("last.pt", 30) and ("best.pt", 30) in written and 2 <= len(written) <= 3
    assert len(written) + writer.replaced == 30 + 3  # every payload submitted was either written or superseded
    assert int(torch.load(tmp_path / "last.pt", weights_only=True)["epoch"]) == 30
    assert int(torch.load(tmp_path / "best.pt", weights_only=True)["epoch"]) == 30


# ------------------------------------------------------------------------------------------ local launcher
def test_local_tasks_get_gpus_of_their_own_round_robin():
    from gliograde.training.launcher import local_gpu_groups

    assert local_gpu_groups(5, ["0", "1"], 1) == ["0", "1", "0", "1", "0"]
    assert local_gpu_groups(3, ["2", "5", "6", "7"], 2) == ["2,5", "6,7", "2,5"]
    assert local_gpu_groups(2, [], 1) == [None, None]


def test_local_tasks_on_the_same_gpu_take_turns(tmp_path):
    from gliograde.training.launcher import gpu_slot

    inside, most, done, lock = [0], [0], [], threading.Lock()  # a count of holders, not timestamps

    def task():
        with gpu_slot("0", str(tmp_path)):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)  # room for another task to enter, were the slot not exclusive
            with lock:
                inside[0] -= 1
                done.append(1)

    threads = [threading.Thread(target=task) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 3 and most[0] == 1  # never two tasks inside the slot at once


# ------------------------------------------------------------------------------------------------ the CV
@pytest.mark.slow
def test_a_cuda_error_in_one_fold_of_a_sequential_cv_names_it_and_the_others_go_on(tiny_cache, tmp_path, monkeypatch):
    from gliograde.training import cv as cv_module
    from gliograde.training import trainer

    real = trainer.train_fold

    def flaky(cfg, *a, **k):
        if cfg.fold == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(cfg, *a, **k)

    monkeypatch.setattr(trainer, "train_fold", flaky)
    with pytest.raises(GliogradeError) as e:
        cv_module.run_cv(tiny(tiny_cache, tmp_path, epochs=1, min_epochs=1, warmup_epochs=0), only=[0, 1, 2])
    assert "fold 1: RuntimeError: CUDA error: an illegal memory access" in str(e.value)
    done = [p.name for p in (tmp_path / "res" / "runs").iterdir()]
    assert sorted(done) == ["fold_0", "fold_2"]  # the folds after the failed one were trained


# ------------------------------------------------------------------------------------------- make gpu-check
def test_gpu_check_without_cuda_is_one_line_and_exit_1(capsys):
    from gliograde.gpucheck import main

    assert main(["--json", "unused.json"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu-check: CUDA is not available here") and "\n" not in err


def _gpu_check_failures(proc, report: dict | None) -> str:
    """Why the check failed, in a form that never raises itself (a skipped step has no detail)."""
    if report is None:
        return f"no report; exit {proc.returncode}; {(proc.stdout + proc.stderr)[-3000:]}"
    return repr([(s.get("step"), s.get("status"), s.get("detail"), s.get("output_tail")) for s in report["steps"]
                 if s.get("status") != "passed"])  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    """The steps that need no CUDA, on the CPU, as a subprocess of their own (DDP gloo processes, a SIGKILLed and
    resumed fold, evaluate and predict on both sides): the script works before the first GPU is lent. Its step
    limits are ceilings for a busy machine, and the kill waits for the trainer's epoch-2 checkpoint, not a clock."""
    import subprocess
    import sys

    out = tmp_path / "gpu-check.json"
    cmd = [sys.executable, "-m", "gliograde.gpucheck", "--device", "cpu", "--workdir", str(tmp_path / "w"), "--json",
           str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1700)
    r = json.loads(out.read_text()) if out.is_file() else None
    assert proc.returncode == 0 and r is not None and r["passed"], _gpu_check_failures(proc, r)
    steps = {s["step"]: s for s in r["steps"]}
    assert steps["pytest-gpu"]["status"] == steps["bench"]["status"] == "skipped"
    assert steps["ddp-fold"]["figures"]["processes"] == 2 and steps["ddp-fold"]["figures"]["batch"]["global"] == 4
    assert steps["resume"]["figures"]["epochs"] == [1, 2, 3, 4]
    assert steps["resume"]["figures"]["resumed_after_epoch"] == 2  # killed where it was held, whatever the speed
    # the CPU's own precision (auto: fp32) in another evaluate process gives the same probabilities to the bit
    evaluated = steps["evaluate"]["figures"]
    assert evaluated["own_precision_max_abs_difference"] == 0.0 and evaluated["fp32_max_abs_difference"] is None
    assert steps["doctor"]["figures"]["diagnostic"]["passed"]


def test_an_impossible_ddp_plan_is_one_line_before_any_process_or_folder(tiny_cache, tmp_path):
    from gliograde.training.trainer import train_fold

    with pytest.raises(GliogradeError) as e:  # a global batch of 3 over 2 gloo processes
        train_fold(tiny(tiny_cache, tmp_path, multi_gpu=True, nproc=2, batch_size=3))
    assert "the global batch 3 (--batch-size 3 x --gradient-accumulation-steps 1) cannot be split evenly over 2" in str(
        e.value
    ) and "\n" not in str(e.value)
    with pytest.raises(GliogradeError, match="micro-batch of 1 volume: BatchNorm would see one volume"):
        train_fold(tiny(tiny_cache, tmp_path, multi_gpu=True, nproc=2, batch_size=2, grad_accum=1))
    assert not (tmp_path / "res" / "runs").exists()
