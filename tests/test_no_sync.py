"""The hot loop without host stalls: the device data path and apply_params copy to the GPU only from pinned memory,
asynchronously, and never synchronise with it; on the CPU they give exactly what the earlier code gave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gliograde.data.augment import AugmentParams, _rotation, affine_grid, apply_params, draw_params, to_device
from gliograde.data.device_path import DeviceStream, DeviceVolumes, epoch_indices


def reference_apply_params(x: torch.Tensor, r: dict) -> torch.Tensor:
    """apply_params as it was before the packed copy: three separate host-to-device copies."""
    b = x.shape[0]
    signs = 1 - 2 * r["flips"].float()
    a = _rotation(r["angles"]) * signs[:, None, :] / r["zoom"][:, None, None]
    theta = torch.cat([a, torch.zeros(b, 3, 1)], dim=2).to(device=x.device, dtype=torch.float32)
    xf = x.float()
    grid = affine_grid(theta, xf.shape[2:])
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    background = (out == 0).all(dim=1, keepdim=True)
    out.mul_(r["scale"].to(x.device)[:, :, None, None, None]).add_(r["shift"].to(x.device)[:, :, None, None, None])
    return out.masked_fill_(background, 0).to(x.dtype)


def reference_stream(volumes: DeviceVolumes, b: int, sampler: str, seed: int, p, grad_accum=1, rank=0, world=1):
    """The micro-batches of one DeviceStream epoch, built the old way from epoch_indices, draw_params and
    reference_apply_params on CPU indices, and the generator after them."""
    g = torch.Generator().manual_seed(seed)
    idx = epoch_indices(volumes.labels, len(volumes) // b * b, sampler, g)
    per_step, steps = grad_accum * world, len(volumes) // b // (grad_accum * world)
    channels, out = volumes.volumes.shape[1], []
    for step in range(steps):
        for k in range(per_step):
            params = draw_params(b, channels, p, g) if p else None
            if k // grad_accum != rank:
                continue
            m = step * per_step + k
            take = idx[m * b : (m + 1) * b]
            x, y = volumes.volumes[take].float(), volumes.labels[take]
            out.append(((reference_apply_params(x, params) if params else x), y))
    return out, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_params_equals_the_unpacked_reference_exactly(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    b, c = 1 + seed, 2 + seed
    x = torch.zeros(b, c, 9, 11, 7)
    x[:, :, 1:8, 2:10, 1:6] = torch.randn(b, c, 7, 8, 5, generator=g)
    x = x.to(dtype)
    for p in (AugmentParams(), AugmentParams(flip_prob=1.0, rotate_deg=30, scale_range=0.3, intensity_shift=0.5)):
        r = draw_params(b, c, p, g)
        got, want = apply_params(x, r), reference_apply_params(x, r)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)


def test_to_device_on_the_cpu_is_the_tensor_itself():
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t


def test_device_labels_and_gather_on_the_cpu(tiny_cache):
    rows = np.arange(len(tiny_cache.ids))
    volumes = DeviceVolumes(tiny_cache, rows, [1, 2], torch.device("cpu"))
    assert torch.equal(volumes.device_labels, volumes.labels)
    assert volumes.index_device == torch.device("cpu")
    idx = torch.tensor([3, 0, 5, 5])
    x, y = volumes.gather(idx)
    assert torch.equal(x, volumes.volumes[idx].float()) and torch.equal(y, volumes.labels[idx])
    batches = list(volumes.batches(5, rank=1, world=2))
    mine = torch.arange(1, len(rows), 2)
    assert torch.equal(torch.cat([y for _, y in batches]), volumes.labels[mine])
    assert torch.equal(torch.cat([x for x, _ in batches]), volumes.volumes[mine].float())


@pytest.mark.parametrize(
    ("sampler", "augment", "grad_accum", "rank", "world"),
    [
        ("shuffle", AugmentParams(), 2, 0, 1),
        ("weighted", AugmentParams(), 1, 1, 2),
        ("weighted", None, 1, 0, 1),
        ("shuffle", AugmentParams(rotate_deg=25), 1, 0, 3),
    ],
)
def test_device_stream_yields_exactly_the_old_batches(tiny_cache, sampler, augment, grad_accum, rank, world):
    rows = np.arange(len(tiny_cache.ids))
    volumes = DeviceVolumes(tiny_cache, rows, [3, 0, 2], torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    # --batch-per-gpu is the old convention (each rank a batch of its own); the default splits the global batch
    stream = DeviceStream(volumes, 2, sampler, g, augment, grad_accum=grad_accum, rank=rank, world=world, per_gpu=True)
    got = list(stream)
    want, g_ref = reference_stream(volumes, 2, sampler, 11, augment, grad_accum, rank, world)
    assert len(got) == len(want) == len(stream) > 0
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    # the shared generator is left exactly where the old code left it (the next epoch draws the same too)
    assert torch.equal(g.get_state(), g_ref.get_state())


class HostCopies(TorchFunctionMode):
    """Records every host-to-device copy that is not from pinned memory with non_blocking, and every CUDA tensor
    indexed by a CPU index (an implicit copy)."""

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and isinstance(out, torch.Tensor):
            src = args[0]
            if src.device.type == "cpu" and out.is_cuda and not (src.is_pinned() and kwargs.get("non_blocking")):
                self.bad.append(f"{func.__name__} from pageable memory or blocking, shape {tuple(src.shape)}")
        elif func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if src.device.type == "cpu" and dst.is_cuda and not (src.is_pinned() and kwargs.get("non_blocking")):
                self.bad.append(f"copy_ from pageable memory or blocking, shape {tuple(src.shape)}")
        elif func in (torch.Tensor.index_select, torch.Tensor.__getitem__, torch.index_select):
            base = args[0]
            index = args[1] if func is torch.Tensor.__getitem__ else (args[2] if len(args) > 2 else kwargs.get("index"))
            if base.is_cuda and isinstance(index, torch.Tensor) and not index.is_cuda:
                self.bad.append(f"CUDA tensor indexed by a CPU index, shape {tuple(index.shape)}")
        return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_device_path_never_synchronises_on_a_gpu(tiny_cache, monkeypatch):
    import gliograde.data.device_path as device_path

    device = torch.device("cuda")
    rows = np.arange(len(tiny_cache.ids))
    resident = DeviceVolumes(tiny_cache, rows, [0, 1, 2, 3], device)
    monkeypatch.setattr(device_path, "DEVICE_MEMORY_FRACTION", 0.0)  # force the pinned-host fallback
    pinned = DeviceVolumes(tiny_cache, rows, [0, 1, 2, 3], device)
    assert resident.on_device and not pinned.on_device and pinned.volumes.is_pinned()
    x = torch.randn(3, 4, 16, 16, 16, device=device)
    r = draw_params(3, 4, AugmentParams(), torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    got = {}
    copies = HostCopies()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with copies:
            for name, volumes in (("resident", resident), ("pinned", pinned)):
                for sampler in ("weighted", "shuffle"):
                    g = torch.Generator().manual_seed(3)
                    stream = DeviceStream(volumes, 2, sampler, g, AugmentParams(), grad_accum=2)
                    got[name, sampler] = [(bx.clone(), by.clone()) for bx, by in stream]
                got[name, "val"] = list(volumes.batches(5))
            out = apply_params(x, r)
            out_half = apply_params(x.half(), r)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert copies.bad == []
    torch.cuda.synchronize()
    # the GPU batches are the CPU batches (up to grid_sample's float rounding on the GPU)
    cpu = DeviceVolumes(tiny_cache, rows, [0, 1, 2, 3], torch.device("cpu"))
    for name in ("resident", "pinned"):
        for sampler in ("weighted", "shuffle"):
            want = list(DeviceStream(cpu, 2, sampler, torch.Generator().manual_seed(3), AugmentParams(), grad_accum=2))
            assert len(got[name, sampler]) == len(want) > 0
            for (gx, gy), (wx, wy) in zip(got[name, sampler], want, strict=True):
                assert gx.is_cuda and gy.is_cuda and torch.equal(gy.cpu(), wy)
                torch.testing.assert_close(gx.cpu(), wx, atol=1e-4, rtol=1e-4)
        assert torch.equal(torch.cat([y for _, y in got[name, "val"]]).cpu(), cpu.labels)
    want = apply_params(x.cpu(), r)
    torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)
    assert out_half.dtype == torch.float16 and out.is_cuda
