"""The device-resident data path: the DataLoader's sampling distributions, reproducible augmented batches, and
DDP (two gloo processes on the CPU) giving the weights of one process with the same global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DDP_REFERENCE, tiny
from torch.utils.data import RandomSampler, WeightedRandomSampler

from gliograde.data.augment import AugmentParams, apply_params, draw_params
from gliograde.data.device_path import DeviceStream, DeviceVolumes, epoch_indices
from gliograde.data.loader_path import inverse_frequency_weights
from gliograde.data.splits import fold_split, folds_for_cache
from gliograde.training.trainer import train_fold


def test_epoch_indices_are_the_dataloader_samplers_draws():
    labels = torch.tensor([0] * 7 + [1] * 21)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    weighted = WeightedRandomSampler(inverse_frequency_weights(labels.numpy()), 28, replacement=True, generator=g1)
    assert epoch_indices(labels, 28, "weighted", g2).tolist() == list(weighted)
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    assert epoch_indices(labels, 28, "shuffle", g2).tolist() == list(RandomSampler(range(28), generator=g1))


def test_the_weighted_stream_balances_the_grades(tiny_cache):
    train_rows = fold_split(tiny_cache, folds_for_cache(tiny_cache), 0).train
    volumes = DeviceVolumes(tiny_cache, train_rows, [0, 1, 2, 3], torch.device("cpu"))
    assert volumes.on_device and volumes.volumes.dtype == torch.float16
    assert volumes.labels.float().mean() > 0.7  # the fold itself is three quarters HGG
    stream = DeviceStream(volumes, 4, "weighted", torch.Generator().manual_seed(0), None)
    drawn = torch.cat([y for _ in range(200) for _, y in stream])
    assert abs(drawn.float().mean().item() - 0.5) < 0.03


def test_stream_batches_are_cache_volumes_augmented_in_draw_order(tiny_cache):
    rows = np.arange(len(tiny_cache.ids))
    volumes = DeviceVolumes(tiny_cache, rows, [3, 0], torch.device("cpu"))
    p = AugmentParams()
    stream = DeviceStream(volumes, 4, "shuffle", torch.Generator().manual_seed(1), p, grad_accum=2)
    got = list(stream)
    assert len(got) == len(stream) == 2 * (len(rows) // 4 // 2)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(rows), generator=g)
    for k, (x, y) in enumerate(got):
        take = idx[4 * k : 4 * k + 4]
        raw = torch.from_numpy(np.asarray(tiny_cache.volumes[take.numpy()][:, [3, 0]], dtype=np.float32))
        assert torch.equal(y, torch.as_tensor(tiny_cache.labels[take.numpy()]))
        assert torch.equal(x, apply_params(raw, draw_params(4, 2, p, g)))


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_keeps_the_configured_global_batch_and_one_process_weights(
    tiny_cache, one_process_run, tmp_path
):
    """--batch-size 2 --gradient-accumulation-steps 2 is a global batch of 4 on one process and on two: under DDP each
    rank takes one micro-batch of 2 per step (the seeds' --multi-gpu splits the batch, as DataParallel did)."""
    single = one_process_run
    ddp = train_fold(tiny(tiny_cache, tmp_path / "two", multi_gpu=True, nproc=2, **DDP_REFERENCE))
    assert ddp.run_dir.parent.parent.parent == tmp_path / "two" / "res"
    assert ddp.final["checkpoint"] == "best.pt" and len(ddp.history) == 2
    config = json.loads((ddp.run_dir / "config" / "config.json").read_text())
    env = config["environment"]
    assert env["processes"] == 2 and env["data_path"] == "DeviceStream"
    assert config["batch"] == {"global": 4, "micro_batch_per_process": 2, "accumulation_per_process": 1,
                               "processes": 2, "convention": "global", "sync_bn": False, "note": None}  # fmt: skip
    a = torch.load(single.run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ddp.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert b["batch_plan"]["global"] == a["batch_plan"]["global"] == 4 and b["precision"]["name"] == "fp32"
    a, b = a["model_state_dict"], b["model_state_dict"]
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # the same steps on the same samples: training losses agree too
    assert [h["train_loss"] for h in ddp.history] == pytest.approx([h["train_loss"] for h in single.history], 1e-4)
    assert not list((tmp_path / "two" / "res").glob("runs/fold_0/run_*/evaluation_*"))
    assert len(list((tmp_path / "two" / "res").glob("runs/fold_0/run_*"))) == 1  # rank 1 wrote no folder


def test_augmentation_is_exact_where_it_can_be_and_draws_within_its_ranges():
    x = torch.zeros(2, 3, 12, 10, 8)
    x[:, :, 2:9, 3:8, 1:6] = torch.randn(2, 3, 7, 5, 5)
    flip_all = AugmentParams(flip_prob=1.0, rotate_deg=0, scale_range=0, intensity_scale=0, intensity_shift=0)
    r = draw_params(2, 3, flip_all, torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_params(x, r), x.flip(2, 3, 4), atol=1e-5, rtol=1e-5)
    identity = AugmentParams(flip_prob=0.0, rotate_deg=0, scale_range=0, intensity_scale=0.5, intensity_shift=0.5)
    r = draw_params(2, 3, identity, torch.Generator().manual_seed(1))
    out = apply_params(x, r)
    brain = (x != 0).any(1, keepdim=True).expand_as(x)
    assert (out[~brain] == 0).all()  # background stays exactly zero whatever the shift
    expected = x * r["scale"][:, :, None, None, None] + r["shift"][:, :, None, None, None]
    torch.testing.assert_close(out[brain], expected[brain], atol=1e-5, rtol=1e-5)
    p = AugmentParams()
    r = draw_params(20000, 4, p, torch.Generator().manual_seed(2))
    assert abs(r["flips"].float().mean().item() - p.flip_prob) < 0.01
    assert r["angles"].abs().max() <= np.radians(p.rotate_deg) + 1e-6
    assert ((r["zoom"] - 1).abs() <= p.scale_range + 1e-6).all()
    assert ((r["scale"] - 1).abs() <= p.intensity_scale + 1e-6).all() and (r["shift"].abs() <= p.intensity_shift).all()


def test_the_broadcast_affine_grid_equals_torchs():
    from gliograde.data.augment import affine_grid

    theta = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(0))
    for size in ((7, 5, 9), (16, 16, 16)):
        expected = torch.nn.functional.affine_grid(theta, [3, 2, *size], align_corners=False)
        torch.testing.assert_close(affine_grid(theta, size), expected, atol=1e-5, rtol=1e-5)


def test_ddp_collectives_run_on_the_ranks_own_device():
    """NCCL bound to the rank's GPU carries every collective (the host-side scalars too): no gloo half to resolve
    a hostname for; gloo on the CPU."""
    from gliograde.training.distributed import backend

    assert backend(cuda=True) == "nccl"
    assert backend(cuda=False) == "gloo"
