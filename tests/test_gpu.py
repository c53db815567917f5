"""GPU checks (skipped without CUDA): bf16/channels_last and fp16 + GradScaler training on both data paths, EMA and
MIL on the GPU, torch.compile (alone and under DDP), DDP on every visible GPU with the configured global batch, GPU
vs CPU scoring of one checkpoint, host syncs in the steady-state training loop, the OOM message, resume on the GPU,
and the bf16 kernels against fp32 layer by layer at the training shapes.

Run them with `pytest -m gpu` on a CUDA machine (`make gpu-check` runs them and more); `pytest -m "not gpu"` leaves
them out. Every other test runs on the CPU even on a GPU machine (tests/conftest.py hides the GPUs from it)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny

from gliograde import runtime
from gliograde.checkpoints import load_checkpoint, select_checkpoint
from gliograde.data.loader_path import CacheDataset, make_val_loader
from gliograde.data.source import load_data
from gliograde.data.splits import fold_split
from gliograde.errors import GliogradeError
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.evaluate import evaluate_run
from gliograde.evaluation.scoring import model_from_checkpoint, score_loader
from gliograde.training.losses import make_loss
from gliograde.training.trainer import train_fold

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_config(run_dir) -> dict:
    return json.loads((run_dir / "config" / "config.json").read_text())


def native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)


def assert_cuda_run(result, epochs: int, precision: str) -> None:
    assert len(result.history) == epochs
    assert result.final["checkpoint"] in ("best.pt", "best_ema.pt")
    recorded = run_config(result.run_dir)["environment"]["precision"]
    assert recorded["name"] == precision and result.final["precision"]["name"] == precision
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["precision"]["name"] == precision
    assert all(h["peak_gpu_memory_gib"] is not None and h["peak_gpu_memory_gib"] > 0 for h in result.history)
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    """64 synthetic cases at 16^3: a fit part (~41 cases) that feeds 8 ranks a micro-batch of 2 each."""
    from gliograde.data.cache import open_cache, prepare_cache
    from gliograde.data.synthetic import synthesize

    tmp = tmp_path_factory.mktemp("wide")
    root, _ = synthesize(tmp / "data", 64, (32, 32, 24), seed=11, workers=2, progress=False)
    return open_cache(prepare_cache(root, tmp / "cache", size=16, workers=2, progress=False).path)


@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["device", "loader"])
def test_auto_precision_channels_last_fold_on_cuda(tiny_cache, tmp_path, data_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", channels_last=True, data_path=data_path, epochs=2, min_epochs=2)
    result = train_fold(cfg)
    assert_cuda_run(result, 2, "bf16" if native_bf16() else "fp16")
    assert run_config(result.run_dir)["environment"]["device"].startswith("cuda")


@pytest.mark.slow
def test_fp16_with_a_grad_scaler_and_ema_on_cuda(tiny_cache, tmp_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", precision="fp16", ema_decay=0.9, data_path="device", epochs=2,
               min_epochs=2)  # fmt: skip
    result = train_fold(cfg)
    assert_cuda_run(result, 2, "fp16")
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["scaler_state_dict"]["scale"] > 0 and last["ema_state_dict"] is not None
    assert (result.run_dir / "checkpoints" / "best_ema.pt").is_file() or result.final["checkpoint"] == "best.pt"


@pytest.mark.slow
def test_mil_fold_on_cuda(tiny_cache, tmp_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", model="mil2d", depth=18, mil_k=4, data_path="device", epochs=2,
               min_epochs=2)  # fmt: skip
    result = train_fold(cfg)
    assert_cuda_run(result, 2, "bf16" if native_bf16() else "fp16")
    assert np.load(result.run_dir / "predictions" / "val_attention.npy").shape[1] == 4


@pytest.mark.slow
def test_compiled_fold_on_cuda(tiny_cache, tmp_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", channels_last=True, data_path="device", compile=True, epochs=2,
               min_epochs=2)  # fmt: skip
    assert_cuda_run(train_fold(cfg), 2, "bf16" if native_bf16() else "fp16")


def _ddp(wide_cache, tmp_path, world, **kw):
    cfg = tiny(wide_cache, tmp_path, device="cuda", data_path="device", multi_gpu=True, nproc=world,
               batch_size=2 * world, epochs=2, min_epochs=2, **kw)  # fmt: skip
    return train_fold(cfg)


@pytest.mark.slow
def test_ddp_on_every_visible_gpu_keeps_the_configured_global_batch(wide_cache, tmp_path):
    world = torch.cuda.device_count()  # one GPU: train_fold warns and trains on one device (world 1)
    result = _ddp(wide_cache, tmp_path, world)
    assert len(result.history) == 2 and result.final["checkpoint"] == "best.pt"
    config = run_config(result.run_dir)
    assert config["environment"]["processes"] == world
    assert config["batch"]["global"] == 2 * world and config["batch"]["micro_batch_per_process"] == 2
    assert len(list((tmp_path / "res").glob("runs/fold_0/run_*"))) == 1  # only rank 0 made a folder


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs 2 GPUs")
def test_compiled_ddp_on_every_visible_gpu(wide_cache, tmp_path):
    result = _ddp(wide_cache, tmp_path, torch.cuda.device_count(), compile=True, channels_last=True)
    assert len(result.history) == 2 and np.isfinite(result.final["auc"])


@pytest.mark.slow
def test_gpu_evaluation_matches_cpu_scoring_of_the_same_checkpoint(tiny_cache, tmp_path):
    cfg = tiny(tiny_cache, tmp_path, device="cuda", precision="fp32", epochs=2, min_epochs=2)
    run = train_fold(cfg).run_dir
    evaluation = evaluate_run(run)
    assert evaluation.metrics["precision"]["name"] == "fp32"
    gpu_probs = np.load(evaluation.out_dir / "val_probs.npy")
    gpu_labels = np.load(evaluation.out_dir / "val_labels.npy")

    # the same checkpoint and validation batches (what evaluate_run builds), scored on the CPU in fp32
    cache, folds = load_data(cfg)
    split = fold_split(cache, folds, cfg.fold)
    train_rows, val_rows = split.train, split.val
    loader = make_val_loader(CacheDataset(cache, val_rows, cache.channels(cfg.modalities)), cfg.batch_size, 0, False)
    path = select_checkpoint(run / "checkpoints", "auto", ema_enabled=cfg.ema_decay > 0)
    assert path.name == evaluation.metrics["checkpoint"]
    model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), path)
    counts = np.bincount(cache.labels[train_rows], minlength=2).tolist()
    _, cpu_probs, cpu_labels = score_loader(
        model, loader, torch.device("cpu"), None, make_loss(cfg, counts)
    )
    np.testing.assert_array_equal(gpu_labels, cpu_labels)
    cpu_probs = OperatingPoint.from_dict(evaluation.metrics["operating_point"]).apply(cpu_probs)  # as evaluate does
    # fp32 on both sides; cuDNN's convolution algorithms (and TF32, which the trainer's backends may enable for
    # matmuls/convolutions on the GPU) differ from the CPU's in rounding only: 2e-3 absolute on probabilities
    np.testing.assert_allclose(gpu_probs, cpu_probs, rtol=0, atol=2e-3)
    on_cpu = evaluate_run(run, device="cpu")  # `evaluate --device cpu` of the same run
    np.testing.assert_allclose(np.load(on_cpu.out_dir / "val_probs.npy"), gpu_probs, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_the_steady_state_training_loop_rarely_synchronizes_with_the_host(tiny_cache, tmp_path, monkeypatch):
    """Sync-debug mode only around the steady-state micro-batches (from the third to the last of the epoch): the
    set-up (model.to(device) alone is 74 copies), cuDNN autotuning, the first optimizer step and the checkpoint
    copies synchronise legitimately and are not counted."""
    import gliograde.data.device_path as device_path
    from gliograde.training import trainer

    monkeypatch.setattr(trainer, "CHECK_EVERY", 10**6)  # the periodic loss read is a sync by design
    real_iter, window = device_path.DeviceStream.__iter__, {"batches": 0}

    def observed(self):
        try:
            for i, batch in enumerate(real_iter(self)):
                if i == 2:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                if i >= 2:
                    window["batches"] += 1
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(device_path.DeviceStream, "__iter__", observed)
    cfg = tiny(tiny_cache, tmp_path, device="cuda", data_path="device", batch_size=2, epochs=1, min_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_fold(cfg)
    assert len(result.history) == 1 and window["batches"] >= 4
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    # fewer than one host sync per steady-state micro-batch (the target is none)
    assert len(syncs) < window["batches"], syncs[:5]


@pytest.mark.slow
def test_a_real_cuda_out_of_memory_is_one_line_naming_the_batch(tiny_cache, tmp_path, monkeypatch):
    from gliograde.training import trainer

    real = trainer.make_loss

    def greedy(*a, **k):  # the first training step asks for twice the GPU's memory: a real OutOfMemoryError
        loss = real(*a, **k)
        forward = loss.forward

        def hungry(logits, y):
            torch.empty(2 * torch.cuda.get_device_properties(0).total_memory, dtype=torch.uint8, device="cuda")
            return forward(logits, y)

        loss.forward = hungry
        return loss

    monkeypatch.setattr(trainer, "make_loss", greedy)
    with pytest.raises(GliogradeError) as e:
        train_fold(tiny(tiny_cache, tmp_path, device="cuda", data_path="device", epochs=1, min_epochs=1))
    message = str(e.value)
    assert "CUDA out of memory at --batch-size 4" in message and "GiB" in message and "\n" not in message
    metrics = next((tmp_path / "res" / "runs" / "fold_0").iterdir()) / "metrics" / "metrics.json"
    assert json.loads(metrics.read_text())["status"] == "failed"


@pytest.mark.slow
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
    assert resumed.final["precision"]["name"] == full.final["precision"]["name"]


@pytest.mark.skipif(not native_bf16(), reason="bf16 needs compute capability >= 8.0")
def test_bf16_kernels_match_fp32_layer_by_layer_at_the_training_shapes():
    """The final preset's shapes: ResNet-50, batch 8, 4 x 128^3, channels_last, cuDNN benchmark on."""
    from gliograde.networks.resnet3d import ResNet3D

    device = torch.device("cuda", 0)
    runtime.configure_backends(device)
    torch.manual_seed(0)
    model = ResNet3D(50, 4, 2).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.randn(8, 4, 128, 128, 128, device=device).contiguous(memory_format=torch.channels_last_3d)
    d = runtime.precision_diagnostic(model, x)
    assert d["channels_last"] and d["cudnn_benchmark"] and d["layers"] == 54
    assert d["passed"], (d["worst_layer"], d["worst"], d["stage_errors"])
