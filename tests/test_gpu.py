"""GPU checks (skipped without CUDA): bf16/channels_last training on both data paths, torch.compile, DDP, GPU vs
CPU scoring of one checkpoint, host syncs in the training loop, and resume on the GPU.

Run them with `pytest -m gpu` on a CUDA machine; `pytest -m "not gpu"` leaves them out."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny

from gliograde.data.loader import CacheDataset, make_val_loader
from gliograde.data.source import load_data
from gliograde.data.splits import fold_indices
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.evaluate import evaluate_run
from gliograde.evaluation.scoring import model_from_checkpoint, predict
from gliograde.training.checkpoints import load_checkpoint, select_checkpoint
from gliograde.training.losses import make_loss
from gliograde.training.trainer import train_fold

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_config(run_dir) -> dict:
    return json.loads((run_dir / "config" / "config.json").read_text())


def assert_bf16_cuda_run(result, epochs: int) -> None:
    assert len(result.history) == epochs
    assert result.final["checkpoint"] in ("best.pt", "best_ema.pt")
    precision = run_config(result.run_dir)["environment"]["precision"]
    assert precision["name"] == "bf16"
    assert precision["check"] is not None and precision["check"]["passed"] is True
    assert all(h["peak_gpu_memory_gib"] is not None and h["peak_gpu_memory_gib"] > 0 for h in result.history)


@pytest.mark.parametrize("data_path", ["device", "loader"])
def test_bf16_channels_last_fold_on_cuda(tiny_cache, tmp_path, data_path):
    cfg = tiny(
        tiny_cache,
        tmp_path,
        device="cuda",
        precision="bf16",
        channels_last=True,
        data_path=data_path,
        epochs=2,
        min_epochs=2,
    )
    result = train_fold(cfg)
    assert_bf16_cuda_run(result, 2)
    env = run_config(result.run_dir)["environment"]
    assert env["device"].startswith("cuda")


def test_compiled_fold_on_cuda(tiny_cache, tmp_path):
    cfg = tiny(
        tiny_cache,
        tmp_path,
        device="cuda",
        precision="bf16",
        channels_last=True,
        data_path="device",
        compile=True,
        epochs=2,
        min_epochs=2,
    )
    assert_bf16_cuda_run(train_fold(cfg), 2)


def test_ddp_on_every_visible_gpu(tiny_cache, tmp_path):
    world = torch.cuda.device_count()  # one GPU: train_fold warns and trains on one device (world 1)
    cfg = tiny(
        tiny_cache,
        tmp_path,
        device="cuda",
        data_path="device",
        multi_gpu=True,
        nproc=world,
        batch_size=2,
        epochs=2,
        min_epochs=2,
    )
    result = train_fold(cfg)
    assert len(result.history) == 2
    assert result.final["checkpoint"] == "best.pt"
    config = run_config(result.run_dir)
    assert config["environment"]["processes"] == world
    assert config["batch"]["global"] == 2 * world
    assert len(list((tmp_path / "res").glob("runs/fold_0/run_*"))) == 1  # only rank 0 made a folder


def test_gpu_evaluation_matches_cpu_scoring_of_the_same_checkpoint(tiny_cache, tmp_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", precision="fp32", epochs=2, min_epochs=2)
    run = train_fold(cfg).run_dir
    evaluation = evaluate_run(run)
    assert evaluation.metrics["precision"]["name"] == "fp32"
    gpu_probs = np.load(evaluation.out_dir / "val_probs.npy")
    gpu_labels = np.load(evaluation.out_dir / "val_labels.npy")

    # the same checkpoint and validation batches (what evaluate_run builds), scored on the CPU in fp32
    cache, folds = load_data(cfg)
    train_rows, val_rows = fold_indices(cache, folds, cfg.fold)
    loader = make_val_loader(CacheDataset(cache, val_rows, cache.channels(cfg.modalities)), cfg.batch_size, 0, False)
    path = select_checkpoint(run / "checkpoints", "auto", ema_enabled=cfg.ema_decay > 0)
    assert path.name == evaluation.metrics["checkpoint"]
    model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), path)
    counts = np.bincount(cache.labels[train_rows], minlength=2).tolist()
    _, cpu_probs, cpu_labels = predict(
        model, loader, torch.device("cpu"), None, make_loss(cfg.loss, counts, cfg.max_m, cfg.ldam_s)
    )
    np.testing.assert_array_equal(gpu_labels, cpu_labels)
    cpu_probs = OperatingPoint.from_dict(evaluation.metrics["operating_point"]).apply(cpu_probs)  # as evaluate does
    # fp32 on both sides; cuDNN's convolution algorithms (and TF32, which the trainer's backends may enable for
    # matmuls/convolutions on the GPU) differ from the CPU's in rounding only: 2e-3 absolute on probabilities
    np.testing.assert_allclose(gpu_probs, cpu_probs, rtol=0, atol=2e-3)


def test_the_training_loop_rarely_synchronizes_with_the_host(tiny_cache, tmp_path):
    batch = 2
    cfg = tiny(
        tiny_cache,
        tmp_path,
        device="cuda",
        precision="fp32",  # no bf16 self-check (it reads its errors back to the host)
        data_path="device",
        batch_size=batch,
        epochs=1,
        min_epochs=1,
    )
    cache, folds = load_data(cfg)
    train_rows, _ = fold_indices(cache, folds, cfg.fold)
    micro_batches = len(train_rows) // batch
    assert micro_batches >= 8
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train_fold(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(result.history) == 1
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    # The whole fold is counted: set-up, the loss/finite checks every CHECK_EVERY steps, the end of the epoch,
    # validation and checkpointing synchronize legitimately, and augmentation / EMA are known to sync too.
    # What must not happen is one (or more) host sync per micro-batch.
    assert len(syncs) < micro_batches, [str(w.message) for w in syncs[:5]]


def test_resume_on_cuda_gives_the_full_history(tiny_cache, tmp_path):
    common = {"device": "cuda", "data_path": "device", "epochs": 3, "min_epochs": 3, "patience": 5}
    full = train_fold(tiny(tiny_cache, tmp_path / "a", **common))

    def stop_after_one(epoch, run_dir):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(tiny(tiny_cache, tmp_path / "b", **common), on_epoch_end=stop_after_one)
    run_b = next((tmp_path / "b" / "res" / "runs" / "fold_0").iterdir())
    assert json.loads((run_b / "metrics" / "metrics.json").read_text())["status"] == "running"
    resumed = train_fold(tiny(tiny_cache, tmp_path / "b", **common, resume=str(run_b)))
    assert resumed.run_dir == run_b
    assert len(resumed.history) == len(full.history) == 3
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history]
